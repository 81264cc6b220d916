"""The ``onnxruntime-cpu`` backend: export to ONNX once, realize a per-layer config with ORT's
real integer kernels (MatMulInteger / ConvInteger for dynamic int8, QLinearConv / QLinearMatMul
for static int8 on calibrated grids, MatMulNBits for int4 weight-only), time the session, and
evaluate the deployed model.

Layers are matched to ONNX nodes by weight *values*, not names: the exporter constant-folds
transposes and renames initializers, but a Linear's weight (or its transpose) and a Conv's weight
survive bit for bit.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from workers.engine.backends.base import interleaved_latency, run_batched
from workers.engine.env import needs_reduce_range
from workers.engine.quant.formats import Grid, LayerFormat, StaticGrids

log = logging.getLogger("modelpress.backend.ort")

__all__ = ["NAME", "Exported", "OrtBackend", "Session", "export", "interleaved_latency",
           "native_format", "needs_reduce_range", "realize", "run_batched", "static_grids"]

NAME = "onnxruntime-cpu"
SUPPORTED: dict[str, set[str]] = {"MatMul": {"fp32", "int8", "int4"}, "Conv": {"fp32", "int8"}}
# Ops between static layers that ORT keeps in uint8 (when their input already is): a chain
# Conv -> ReLU -> MaxPool -> Flatten -> MatMul then never leaves the integer domain.
GLUE = {"Relu", "Clip", "MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}


@dataclass
class Exported:
    """An fp32 ONNX model with its Linear/Conv layers mapped to nodes."""

    model: onnx.ModelProto
    input_names: list[str]
    node_of: dict[str, str] = field(default_factory=dict)  # layer name -> node name
    op_of: dict[str, str] = field(default_factory=dict)  # layer name -> MatMul | Conv
    # Static int8: calibration feeds, ORT's calibrated tensor ranges (its cache file's bytes,
    # computed once) and the grids each layer got, read back from a realized model.
    calibration: list[dict[str, np.ndarray]] = field(default_factory=list)
    ranges: bytes | None = None
    grids: dict[str, StaticGrids] | None = None

    def set_calibration(self, inputs: Sequence[torch.Tensor], batch: int = 32) -> None:
        self.calibration = [{n: t[i:i + batch].numpy() for n, t in zip(self.input_names, inputs,
                                                                       strict=True)}
                            for i in range(0, len(inputs[0]), batch)]
        self.ranges = self.grids = None

    def supports(self, layer: str, fmt: LayerFormat) -> bool:
        op = self.op_of.get(layer)
        weight_only_int8 = fmt.precision == "int8" and fmt.activations == "none"
        return op is not None and fmt.precision in SUPPORTED[op] and not weight_only_int8


def export(module: nn.Module, example: Sequence[torch.Tensor], input_names: list[str],
           layers: Mapping[str, nn.Module]) -> Exported:
    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic = tuple({0: batch} for _ in example)
    with warnings.catch_warnings():
        # An uploaded program's module reports training mode and refuses .eval(); its graph
        # was captured in the mode the user exported it in, so the warning says nothing.
        warnings.filterwarnings("ignore", "Exporting a model while it is in training mode")
        prog = torch.onnx.export(module, tuple(example), input_names=input_names, dynamo=True,
                                 dynamic_shapes=dynamic, optimize=True, verbose=False)
    assert prog is not None
    model = _gemm_to_matmul(prog.model_proto)
    exported = Exported(model=model, input_names=input_names)
    _map_layers(exported, layers)
    return exported


def _gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Gemm(x, W, b, transB=1) -> MatMul(x, W^T) + Add(b): ORT's dynamic int8 and int4
    quantizers handle MatMul, not Gemm."""
    inits = {i.name: i for i in model.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type == "Gemm" and node.input[1] in inits and attrs.get("transA", 0) == 0
                and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0):
            w = numpy_helper.to_array(inits[node.input[1]])
            if attrs.get("transB", 0):
                w = w.T
            wt_name = f"{node.input[1]}__kn"
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), wt_name))
            mm_out = f"{node.output[0]}__mm" if len(node.input) > 2 else node.output[0]
            nodes.append(helper.make_node("MatMul", [node.input[0], wt_name], [mm_out],
                                          name=f"{node.name}__matmul"))
            if len(node.input) > 2:
                nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]],
                                              name=f"{node.name}__bias"))
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def _map_layers(exported: Exported, layers: Mapping[str, nn.Module]) -> None:
    graph = exported.model.graph
    by_shape: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        by_shape.setdefault(tuple(arr.shape), []).append((init.name, arr))
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    for name, mod in layers.items():
        w = mod.weight.detach().float().numpy()  # type: ignore[union-attr, operator]
        want = w.T if isinstance(mod, nn.Linear) else w
        for init_name, arr in by_shape.get(tuple(want.shape), []):
            if arr.dtype == np.float32 and np.array_equal(arr, want):
                ops = [n for n in consumers.get(init_name, []) if n.op_type in SUPPORTED]
                if len(ops) == 1:
                    exported.node_of[name] = ops[0].name
                    exported.op_of[name] = ops[0].op_type
                break
    missing = sorted(set(layers) - set(exported.node_of))
    if missing:
        log.info("layers without a quantizable ONNX node (kept fp32): %s", missing)


def realize(exported: Exported, config: Mapping[str, LayerFormat]) -> onnx.ModelProto:
    """The deployable model for ``config``: static int8 nodes first (calibrated on the float
    graph), then int4 nodes through MatMulNBits, then dynamic int8 nodes; the rest stays fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.ModelProto()
    model.CopyFrom(exported.model)
    static = [n for n, f in config.items() if f.is_static and exported.supports(n, f)]
    if static:
        model = _realize_static(exported, model, static)
    int4 = [(exported.node_of[n], f.group_size) for n, f in config.items()
            if f.precision == "int4" and exported.supports(n, f)]
    for group in sorted({g for _, g in int4}):
        nodes = {node for node, g in int4 if g == group}
        # nodes_to_include *adds* to "every MatMul"; excluding the others is what restricts it.
        others = [n.name for n in model.graph.node if n.name not in nodes]
        q = MatMulNBitsQuantizer(model, bits=4, block_size=group, is_symmetric=True,
                                 nodes_to_exclude=others)
        q.process()
        model = q.model.model
    int8 = [exported.node_of[n] for n, f in config.items()
            if f.quantizes_activations and exported.supports(n, f)]
    if int8:
        with tempfile.TemporaryDirectory() as tmp:
            dst = Path(tmp) / "out.onnx"
            quantize_dynamic(model, dst, per_channel=True, weight_type=QuantType.QInt8,
                             reduce_range=needs_reduce_range(),
                             nodes_to_quantize=int8, extra_options={"MatMulConstBOnly": True})
            model = onnx.load(dst)
    return model


class _Feeds:
    """ORT's CalibrationDataReader protocol over the exported model's calibration feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _bias_add(model: onnx.ModelProto, node_name: str) -> str | None:
    """The Add that applies a Linear's bias after its MatMul, if there is one."""
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name for i in model.graph.initializer}
    out = nodes[node_name].output[0]
    for n in model.graph.node:
        if n.op_type == "Add" and out in n.input and any(i in inits for i in n.input if i != out):
            return str(n.name)
    return None


def _realize_static(exported: Exported, model: onnx.ModelProto, layers: list[str]
                    ) -> onnx.ModelProto:
    """QOperator static quantization of ``layers`` (with their bias adds and the glue between
    them), per-channel int8 weights, uint8 activations on ranges calibrated once per export."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if not exported.calibration:
        raise ValueError("int8-static needs calibration data: call Exported.set_calibration")
    nodes = [exported.node_of[n] for n in layers]
    nodes += [a for a in (_bias_add(model, n) for n in list(nodes)) if a]
    nodes += [n.name for n in model.graph.node if n.op_type in GLUE]
    with tempfile.TemporaryDirectory() as tmp:
        cache, src, dst = (Path(tmp) / n for n in ("ranges.json", "in.onnx", "out.onnx"))
        # By path: given a ModelProto, ORT moves its tensors to external data in place.
        onnx.save(model, src)
        if exported.ranges is not None:
            cache.write_bytes(exported.ranges)
        quiet = logging.getLogger()
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # ORT's "consider pre-processing" warnings, per call
        try:
            quantize_static(src, dst, _Feeds(exported.calibration),
                            quant_format=QuantFormat.QOperator, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            reduce_range=needs_reduce_range(), nodes_to_quantize=nodes,
                            calibration_cache_path=cache,
                            extra_options={"MatMulConstBOnly": True})
        finally:
            quiet.setLevel(level)
        exported.ranges = cache.read_bytes()
        return onnx.load(dst)


def static_grids(exported: Exported) -> dict[str, StaticGrids]:
    """Each layer's calibrated grids, read from the model with every layer static: the exact
    scales and zero points the kernels use (ranges do not depend on which other layers are
    static: they are calibrated on the float graph)."""
    if exported.grids is not None:
        return exported.grids
    layers = list(exported.node_of)
    model = _realize_static(exported, exported.model, layers)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    wanted = set(exported.node_of.values())
    weights = {n.name: n.input[1] for n in exported.model.graph.node if n.name in wanted}

    def grid(scale: str, zp: str) -> Grid:
        return Grid(float(inits[scale]), int(inits[zp]))

    by_weight = {n.input[3]: n for n in model.graph.node
                 if n.op_type in ("QLinearConv", "QLinearMatMul")}
    grids: dict[str, StaticGrids] = {}
    for layer in layers:
        node = by_weight.get(weights[exported.node_of[layer]] + "_quantized")
        if node is None:
            continue
        inp, out = grid(node.input[1], node.input[2]), grid(node.input[6], node.input[7])
        add = next((n for n in model.graph.node
                    if n.op_type == "QLinearAdd" and n.input[0] == node.output[0]), None)
        if add is None:
            grids[layer] = StaticGrids(inp, out)
            continue
        b = grid(add.input[4], add.input[5])
        bias = (inits[add.input[3]].astype(np.float64) - b.zero_point) * b.scale
        grids[layer] = StaticGrids(inp, grid(add.input[6], add.input[7]), product=out,
                                   bias=tuple(float(v) for v in bias.astype(np.float32).ravel()))
    exported.grids = grids
    return grids


def native_format(exported: Exported, layer: str, fmt: LayerFormat) -> LayerFormat:
    """``fmt`` with the arithmetic this backend really uses for ``layer``'s node: 7-bit weights
    without VNNI, one weight scale per tensor for ConvInteger (ORT's dynamic Conv), and for
    static int8 the grids calibration gave the layer."""
    if fmt.precision != "int8":
        return fmt
    if fmt.is_static:
        return replace(fmt, reduce_range=needs_reduce_range(), per_channel=True,
                       grids=static_grids(exported).get(layer))
    return replace(fmt, reduce_range=needs_reduce_range(),
                   per_channel=exported.op_of[layer] != "Conv")


class Session:
    """An ORT CPU session with fixed threads, so configs are timed under equal conditions."""

    def __init__(self, model: onnx.ModelProto, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # Idle worker threads would otherwise spin for a while after each run and steal the
        # cores from whatever is timed next (another session of the frontier, say).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Next to a static int8 layer (a DequantizeLinear on its input), ORT's MatMulAddFusion
        # and WeightBiasQuantization quietly quantize a *float* layer's weight to int8 (a float
        # Conv between two static layers, say); a layer configured fp32 stays fp32.
        static = any(n.op_type.startswith("QLinear") for n in model.graph.node)
        self.sess = ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"],
            disabled_optimizers=["MatMulAddFusion", "WeightBiasQuantization"] if static else None)
        self.input_names = [i.name for i in self.sess.get_inputs()]
        self.model = model
        self.size_bytes = model.ByteSize()

    def artifact(self) -> tuple[str, bytes]:
        return "model.onnx", self.model.SerializeToString()

    def run(self, inputs: Sequence[torch.Tensor]) -> np.ndarray:
        feed = {n: t.numpy() for n, t in zip(self.input_names, inputs, strict=True)}
        out: Any = self.sess.run(None, feed)[0]
        return np.asarray(out)

    def latency_ms(self, inputs: Sequence[torch.Tensor], warmup: int, repeats: int,
                   min_time_s: float = 0.0) -> list[float]:
        feed = {n: t.numpy() for n, t in zip(self.input_names, inputs, strict=True)}
        for _ in range(warmup):
            self.sess.run(None, feed)
        samples: list[float] = []
        start = time.perf_counter()
        while len(samples) < repeats or (samples and time.perf_counter() - start < min_time_s):
            t0 = time.perf_counter()
            self.sess.run(None, feed)
            samples.append((time.perf_counter() - t0) * 1e3)
        return samples


class OrtBackend:
    """The :class:`~workers.engine.backends.base.Backend` over one exported model."""

    name = NAME
    device = torch.device("cpu")

    def __init__(self, exported: Exported, example: Sequence[torch.Tensor],
                 calibration: Sequence[torch.Tensor], threads: int) -> None:
        self.exported = exported
        self.example = tuple(example)
        self.calibration = tuple(calibration)
        self.threads = threads
        self.op_of = exported.op_of

    @classmethod
    def open(cls, module: nn.Module, example: Sequence[torch.Tensor], input_names: list[str],
             layers: Mapping[str, nn.Module], calibration: Sequence[torch.Tensor], threads: int
             ) -> OrtBackend:
        exported = export(module, example, input_names, layers)
        exported.set_calibration(calibration)
        return cls(exported, example, calibration, threads)

    def supports(self, layer: str, fmt: LayerFormat) -> bool:
        return self.exported.supports(layer, fmt)

    def native_format(self, layer: str, fmt: LayerFormat) -> LayerFormat:
        return native_format(self.exported, layer, fmt)

    def realize(self, config: Mapping[str, LayerFormat]) -> Session:
        return Session(realize(self.exported, config), self.threads)

    def rebuilt(self, module: nn.Module) -> OrtBackend:
        from workers.engine.quant.task import quantizable_layers

        return OrtBackend.open(module, self.example, self.exported.input_names,
                               quantizable_layers(module), self.calibration, self.threads)

    def default_levels(self, has_conv: bool) -> list[str]:
        """Static int8 where convolutions are (ORT's dynamic ConvInteger is slower than its
        float convolution; the static chain is faster), dynamic int8 elsewhere (per-call
        ranges keep transformers' activation outliers): ``benchmarks/default_levels.py``
        measured digits-cnn 10.7x slower with ConvInteger, 0.78x with QLinearConv, and MiniLM
        all static at cosine 0.914 vs 0.993 dynamic (2-core EPYC, 2026-12-02)."""
        return ["int8-static" if has_conv else "int8", "int4"]

    def describe(self) -> str:
        return ("ONNX Runtime's integer kernels (MatMulInteger / ConvInteger, QLinearConv / "
                "QLinearMatMul, MatMulNBits)")
