"""The ``torch-cpu`` and ``torch-cuda`` backends: a per-layer config realized as a PyTorch model
whose quantized layers call real low-precision kernels, timed in eager mode.

Kernels per precision (Linear layers; Conv layers take fp32 / bf16 / fp16):
- bf16 / fp16: weight and bias in that dtype, the input cast in and the output cast back
  (oneDNN on CPUs, with AMX where the CPU has it; cuBLAS on GPUs).
- int8: W8A8. Weights int8 per output channel, inputs symmetric int8 per token quantized per
  call, the int32 product by ``torch._int_mm``, rescaled in fp32. Without VNNI the weights use
  7 bits, like ORT's reduce_range (u8 x s8 pair sums saturate in int16 otherwise).
- int8-weight: weight-only int8 per output channel; CPU ``torch._weight_int8pack_mm`` (computes
  in bf16), CUDA ``gpu_kernels.qmatmul`` (our Triton kernel, fp32).
- int4: weight-only, group-wise, symmetric with MatMulNBits' scale (the block's extreme / -8);
  CPU ``torch._weight_int4pack_mm_for_cpu`` (bf16, bf16 scales), CUDA ``gpu_kernels.qmatmul``.
- fp8 (CUDA, compute capability 8.9+): e4m3 weights and inputs, one scale per tensor (the
  input's per call), ``torch._scaled_mm``.

The artifact is a safetensors state dict of the realized model: quantized layers hold their
portable tensors (int8 ``qweight``, int4 nibbles packed two per byte, ``scale``), the config in
its metadata; :func:`load` rebuilds the model from it and the float architecture.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from workers.engine import timing
from workers.engine.backends.base import state_bytes, tied_names
from workers.engine.env import needs_reduce_range
from workers.engine.quant.fake import int4_codes, int8_codes
from workers.engine.quant.formats import LayerFormat, parse

NAMES = {"torch-cpu": "cpu", "torch-cuda": "cuda"}
CONV = (nn.Conv1d, nn.Conv2d)
DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _op(layer: nn.Module) -> str:
    return "Linear" if isinstance(layer, nn.Linear) else "Conv"


class _Cast(nn.Module):
    """A layer computing in bf16 / fp16 inside a float model: the product in that dtype, the
    bias added in fp32 (what the simulation assumes)."""

    bias: torch.Tensor | None

    def __init__(self, layer: nn.Module, precision: str,
                 cast: dict[tuple[int, torch.dtype], nn.Parameter] | None = None) -> None:
        super().__init__()
        self.dtype = DTYPE[precision]
        bias = layer.bias
        self.register_buffer("bias", bias.detach().float().clone()
                             if isinstance(bias, torch.Tensor) else None)
        layer.bias = None  # type: ignore[assignment]
        # New parameters, not ``layer.to(dtype)``: that converts a Parameter in place, and a
        # tied one (a head sharing its embedding's weight) would turn the other layer to this
        # dtype too. ``cast`` (one per realized model) keeps layers tied to each other tied.
        cast = {} if cast is None else cast
        for name, p in list(layer.named_parameters(recurse=False)):
            key = (id(p), self.dtype)
            if key not in cast:
                cast[key] = nn.Parameter(p.detach().to(self.dtype), requires_grad=p.requires_grad)
            setattr(layer, name, cast[key])
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layer(x.to(self.dtype)).to(x.dtype)
        if self.bias is None:
            return out
        shape = [-1 if i == (out.dim() - 1 if isinstance(self.layer, nn.Linear) else 1) else 1
                 for i in range(out.dim())]
        return out.add_(self.bias.reshape(shape).to(out.dtype))  # in place: see _Quantized._bias


class _Quantized(nn.Module):
    """A Linear with quantized weights. ``qweight`` / ``scale`` (and ``bias``) are the portable
    state; ``refresh`` derives whatever layout the kernel wants from them."""

    qweight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, layer: nn.Linear, fmt: LayerFormat, cpu: bool) -> None:
        super().__init__()
        self.fmt = fmt
        self.on_cpu = cpu  # which kernels: CPU ones, or CUDA ones
        self.in_features, self.out_features = layer.in_features, layer.out_features
        bias = layer.bias.detach().float().clone() if layer.bias is not None else None
        self.register_buffer("bias", bias)

    def refresh(self) -> None:
        """Rebuild kernel-specific buffers after ``qweight`` / ``scale`` were loaded."""

    def _bias(self, y: torch.Tensor) -> torch.Tensor:
        """In fp32, after the kernel's product (as the simulation assumes). In place: ``y`` is
        the kernel's fresh output, and on CPUs a fresh M x N temporary can cost more than the
        addition (glibc may hand large blocks back to the OS, so a call page-faults them in:
        see ``env.tune_allocator``)."""
        y = y.float()
        return y if self.bias is None else y.add_(self.bias)


def _int8_grid(w: torch.Tensor, reduce_range: bool, compute: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The simulation's int8 codes (per channel) as the kernels store them."""
    q, scale = int8_codes(w, reduce_range, True, compute)
    return q.to(torch.int8), scale[:, 0]


class _Int8Dynamic(_Quantized):
    def __init__(self, layer: nn.Linear, fmt: LayerFormat, cpu: bool) -> None:
        super().__init__(layer, fmt, cpu)
        q, scale = _int8_grid(layer.weight.detach().float(), fmt.reduce_range, "fp32")
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        s = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
        q = torch.round(x2 / s).clamp(-127, 127).to(torch.int8)
        rows = q.shape[0]
        if q.is_cuda and rows <= 16:  # cuBLAS int8 GEMM wants more than 16 rows
            q = nn.functional.pad(q, (0, 0, 0, 17 - rows))
        # qweight (out, in) row-major = the (in, out) column-major operand the kernels want.
        acc = torch._int_mm(q, self.qweight.t())[:rows]
        y = self._bias(acc.float().mul_(s).mul_(self.scale))
        return y.reshape(*lead, self.out_features).to(x.dtype)


class _Int8Weight(_Quantized):
    def __init__(self, layer: nn.Linear, fmt: LayerFormat, cpu: bool) -> None:
        super().__init__(layer, fmt, cpu)
        q, scale = _int8_grid(layer.weight.detach().float(), False, fmt.compute)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if not self.on_cpu:
            from gpu_kernels.qmatmul import qmatmul

            y = qmatmul(x2.float(), self.qweight, self.scale, None, bits=8, impl="triton")
        else:
            dt = DTYPE[self.fmt.compute]
            y = torch._weight_int8pack_mm(x2.to(dt), self.qweight, self.scale.to(dt))
        return self._bias(y).reshape(*lead, self.out_features).to(x.dtype)


class _Int4Weight(_Quantized):
    packed: torch.Tensor
    scales_and_zeros: torch.Tensor

    def __init__(self, layer: nn.Linear, fmt: LayerFormat, cpu: bool) -> None:
        super().__init__(layer, fmt, cpu)
        w = layer.weight.detach().float()  # in_features is a whole number of groups (supports)
        codes, scale = int4_codes(w, fmt.group_size, fmt.compute)
        q = (codes + 8).to(torch.uint8).reshape(w.shape)
        self.register_buffer("qweight", q[:, 0::2] | (q[:, 1::2] << 4))  # gpu_kernels' layout
        self.register_buffer("scale", scale[..., 0])  # (out, in / group_size)
        self.refresh()

    def refresh(self) -> None:
        if not self.on_cpu:
            return
        from gpu_kernels.qmatmul import unpack_int4

        q = unpack_int4(self.qweight).to(torch.int32)
        dt = DTYPE[self.fmt.compute]
        zeros = torch.zeros_like(self.scale)
        # tinygemm's layout: (in / group_size, out, [scale, zero]); w = (q - 8) * scale + zero.
        sz = torch.stack([self.scale, zeros], dim=-1).transpose(0, 1).contiguous().to(dt)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 1),
                             persistent=False)
        self.register_buffer("scales_and_zeros", sz, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if not self.on_cpu:
            from gpu_kernels.qmatmul import qmatmul

            y = qmatmul(x2.float(), self.qweight, self.scale, None, bits=4,
                        group_size=self.fmt.group_size, impl="triton")
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2.to(DTYPE[self.fmt.compute]), self.packed,
                                                  self.fmt.group_size, self.scales_and_zeros)
        return self._bias(y).reshape(*lead, self.out_features).to(x.dtype)


class _Fp8(_Quantized):
    def __init__(self, layer: nn.Linear, fmt: LayerFormat, cpu: bool) -> None:
        super().__init__(layer, fmt, cpu)
        w = layer.weight.detach().float()
        scale = w.abs().amax().clamp(min=1e-12) / 448.0
        self.register_buffer("qweight", (w / scale).to(torch.float8_e4m3fn))
        self.register_buffer("scale", scale.reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        s = x2.abs().amax().clamp(min=1e-12) / 448.0
        q = (x2 / s).to(torch.float8_e4m3fn)
        rows = q.shape[0]
        if rows % 16:  # padded rows cost little and spare a shape rule we could not check
            q = nn.functional.pad(q.view(torch.uint8), (0, 0, 0, 16 - rows % 16)).view(q.dtype)
        y = torch._scaled_mm(q, self.qweight.t(), scale_a=s, scale_b=self.scale,
                             out_dtype=torch.float32)[:rows]
        return self._bias(y).reshape(*lead, self.out_features).to(x.dtype)


def _quantized(layer: nn.Module, fmt: LayerFormat, cpu: bool,
               cast: dict[tuple[int, torch.dtype], nn.Parameter] | None = None) -> nn.Module:
    if fmt.precision in ("bf16", "fp16"):
        return _Cast(layer, fmt.precision, cast)
    assert isinstance(layer, nn.Linear)
    kind = {"fp8": _Fp8, "int4": _Int4Weight}.get(fmt.precision) or (
        _Int8Dynamic if fmt.quantizes_activations else _Int8Weight)
    return kind(layer, fmt, cpu)


@contextmanager
def ieee_fp32() -> Iterator[None]:
    """fp32 layers compute in fp32 on a GPU too. cuDNN's convolutions default to TF32
    (``torch.backends.cudnn.conv.fp32_precision == "tf32"``): 10-bit mantissas that neither the
    simulation nor the CPU kernels nor the "fp32" label have, enough to leave most of an int8
    Linear's deviation unexplained by the simulation. The new API only: reading the legacy
    ``allow_tf32`` flags raises once the two APIs are mixed. CPU kernels ignore these flags."""
    conv = torch.backends.cudnn.conv  # type: ignore[attr-defined]  # set at import, untyped
    matmul = torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, child, new)


class TorchModel:
    """A realized config: the model with its quantized layers, on the backend's device."""

    def __init__(self, module: nn.Module, device: torch.device, backend: str,
                 config: Mapping[str, LayerFormat]) -> None:
        self.module = module
        self.device = device
        self.backend = backend
        self.config = dict(config)
        self.size_bytes = state_bytes(module.state_dict())  # tied tensors once, as shipped

    def _inputs(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.device) for t in inputs)

    def run(self, inputs: Sequence[torch.Tensor]) -> np.ndarray:
        with torch.inference_mode(), ieee_fp32():
            out = self.module(*self._inputs(inputs))
        return np.asarray(out.float().cpu().numpy())

    def latency_ms(self, inputs: Sequence[torch.Tensor], warmup: int, repeats: int
                   ) -> list[float]:
        args = self._inputs(inputs)
        with torch.inference_mode(), ieee_fp32():
            return timing.measure(lambda: self.module(*args), warmup=warmup, repeats=repeats,
                                  device=self.device).samples_ms

    def artifact(self) -> tuple[str, bytes]:
        from safetensors.torch import save

        full = self.module.state_dict()
        # A tied tensor is stored once; its other names are listed and filled in by ``load``.
        tied = tied_names(full)
        # Cloned: distinct views of one storage are refused by safetensors.
        state = {k: v.detach().cpu().clone().contiguous()
                 for k, v in full.items() if k not in tied}
        config = {n: f.label() for n, f in self.config.items() if f.precision != "fp32"}
        meta = {"backend": self.backend, "config": json.dumps(config, sort_keys=True),
                "tied": json.dumps(tied, sort_keys=True),
                "formats": json.dumps({n: _format_json(f) for n, f in self.config.items()
                                       if f.precision != "fp32"}, sort_keys=True)}
        return "model.safetensors", save(state, metadata=meta)


def _format_json(fmt: LayerFormat) -> dict[str, object]:
    return {"label": fmt.label(), "reduce_range": fmt.reduce_range, "compute": fmt.compute,
            "activation_grid": fmt.activation_grid}


class TorchBackend:
    """The :class:`~workers.engine.backends.base.Backend` over a float PyTorch model."""

    def __init__(self, name: str, module: nn.Module, layers: Mapping[str, nn.Module]) -> None:
        if name not in NAMES:
            raise ValueError(f"unknown torch backend {name!r}; one of {sorted(NAMES)}")
        self.name = name
        self.device = torch.device(NAMES[name])
        self.module = module
        self.layers = dict(layers)
        self.op_of = {n: _op(m) for n, m in self.layers.items()
                      if isinstance(m, (nn.Linear, *CONV))}

    def precisions(self, op: str) -> set[str]:
        if op == "Conv":
            return {"fp32", "bf16", "fp16"}
        out = {"fp32", "bf16", "fp16", "int8", "int8-weight", "int4"}
        if self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) >= (8, 9):
            out.add("fp8")
        return out

    def supports(self, layer: str, fmt: LayerFormat) -> bool:
        op = self.op_of.get(layer)
        label = "int4" if fmt.precision == "int4" else fmt.label()
        if op is None or label not in self.precisions(op):
            return False
        mod = self.layers[layer]
        if not isinstance(mod, nn.Linear):
            return True
        k, n = mod.in_features, mod.out_features
        if fmt.precision == "int4":  # the CPU kernel packs 16 output rows per tile
            return k % fmt.group_size == 0 and (self.device.type == "cuda" or (
                fmt.group_size in (32, 64, 128, 256) and n % 16 == 0))
        if fmt.precision == "fp8":
            return k % 16 == 0 and n % 16 == 0
        if fmt.quantizes_activations and self.device.type == "cuda":  # torch._int_mm's shapes
            return k % 8 == 0 and n % 8 == 0
        return True

    def native_format(self, layer: str, fmt: LayerFormat) -> LayerFormat:
        cpu = self.device.type == "cpu"
        if fmt.quantizes_activations and fmt.precision == "int8":
            return replace(fmt, activation_grid="int8-token", per_channel=True,
                           reduce_range=cpu and needs_reduce_range())
        if fmt.precision == "int8":  # weight-only
            return replace(fmt, per_channel=True, reduce_range=False,
                           compute="bf16" if cpu else "fp32")
        if fmt.precision == "int4":
            return replace(fmt, compute="bf16" if cpu else "fp32")
        return fmt

    def realize(self, config: Mapping[str, LayerFormat]) -> TorchModel:
        module = copy.deepcopy(self.module)
        cast: dict[tuple[int, torch.dtype], nn.Parameter] = {}
        for name, fmt in config.items():
            if fmt.precision == "fp32":
                continue
            if not self.supports(name, fmt):
                raise ValueError(f"{self.name} does not run {fmt.label()} on layer {name}")
            _replace(module, name, _quantized(module.get_submodule(name), fmt,
                                              self.device.type == "cpu", cast))
        return TorchModel(module.to(self.device), self.device, self.name, config)

    def rebuilt(self, module: nn.Module) -> TorchBackend:
        from workers.engine.quant.task import quantizable_layers

        return TorchBackend(self.name, module, quantizable_layers(module))

    def default_levels(self, has_conv: bool) -> list[str]:
        """16-bit first (every layer type has it), then int8 for the Linear layers; fp8 instead
        of int8 where the GPU has fp8 tensor cores."""
        if "fp8" in self.precisions("Linear"):
            return ["bf16", "fp8"]
        return ["bf16", "int8"]

    def describe(self) -> str:
        return (f"PyTorch {torch.__version__} eager kernels on {self.device.type} (bf16/fp16 "
                "GEMMs and convolutions, torch._int_mm for int8, weight-only int8/int4 "
                "kernels, torch._scaled_mm for fp8)")


def load(module: nn.Module, data: bytes) -> nn.Module:
    """The deployed model from a ``model.safetensors`` artifact and a float model of the same
    architecture (the quantized layers' float weights are not used), on the artifact's
    backend's device."""
    from safetensors.torch import load as load_tensors

    from workers.engine.quant.task import quantizable_layers

    meta = _metadata(data)
    if meta["backend"] == "torch-cuda" and not torch.cuda.is_available():
        raise ValueError("this artifact was realized for torch-cuda (GPU kernels); load it on a "
                         "machine with a CUDA GPU")
    backend = TorchBackend(meta["backend"], module, quantizable_layers(module))
    formats = {n: _parse_format(f) for n, f in json.loads(meta["formats"]).items()}
    realized = backend.realize(formats).module
    tensors = load_tensors(data)
    for alias, name in json.loads(meta.get("tied", "{}")).items():
        tensors[alias] = tensors[name]
    realized.load_state_dict({k: v.to(backend.device) for k, v in tensors.items()})
    for m in realized.modules():
        if isinstance(m, _Quantized):
            m.refresh()
    try:
        return realized.eval()
    except NotImplementedError:  # an exported program's module has no train/eval modes
        return realized


def _metadata(data: bytes) -> dict[str, str]:
    """The header of a safetensors blob: 8-byte little-endian length, then JSON."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or "formats" not in meta or "backend" not in meta:
        raise ValueError("not a modelpress torch artifact: no backend / formats metadata")
    return {str(k): str(v) for k, v in meta.items()}


def _parse_format(spec: Mapping[str, object]) -> LayerFormat:
    fmt = parse(str(spec["label"]))
    return replace(fmt, reduce_range=bool(spec["reduce_range"]),
                   compute=spec["compute"],  # type: ignore[arg-type]
                   activation_grid=spec["activation_grid"])  # type: ignore[arg-type]
