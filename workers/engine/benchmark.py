"""The ``benchmark`` job: latency, throughput, peak memory and a per-layer table of a model on
the worker's device, with where and how it was measured."""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict

import torch
from torch import nn

from app.schemas import BenchmarkResult, BenchmarkSpec, LayerLatency
from workers.engine import env, models
from workers.engine.context import JobContext, UserError, inputs_at_fault
from workers.engine.timing import PeakMemory, Timing, measure

PER_LAYER_PASSES = 20


def run(spec: BenchmarkSpec, ctx: JobContext) -> BenchmarkResult:
    device = env.resolve_device(spec.device)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    ctx.progress("load", 0.02, f"loading {spec.model.label()}")
    model = models.load_model(spec.model, ctx)
    inputs = _inputs(spec, model, ctx)
    module = model.for_inference(device)
    inputs = tuple(t.to(device) for t in inputs)
    ctx.log.info("benchmarking %s on %s, inputs %s", model.name, device,
                 [list(t.shape) for t in inputs])

    def forward() -> object:
        with torch.inference_mode():
            return module(*inputs)

    total = spec.repeats

    def on_step(done: int, elapsed: float) -> None:
        frac = max(done / total, elapsed / spec.min_time_s if spec.min_time_s else 0.0)
        ctx.progress("measure", 0.05 + 0.8 * min(frac, 1.0),
                     f"{done} of {total} timed runs" if not spec.min_time_s else
                     f"{done} timed runs, {elapsed:.0f} of {spec.min_time_s:g} s")

    # The memory window opens before the first inference, so it sees activations and
    # workspaces being allocated (later runs reuse them and would show no increase). It closes
    # before the timed runs: on CPUs it samples on a thread every millisecond, whose wake-ups
    # would be timed with the model (about 10% on a 2-core VM).
    with PeakMemory(device) as mem:
        with inputs_at_fault("the model does not run on the given inputs",
                             exported_for=model.info.get("inputs")):
            forward()
        ctx.progress("warmup", 0.05, f"{spec.warmup} warm-up runs")
        measure(forward, warmup=spec.warmup, repeats=0, device=device)
    timed = measure(forward, warmup=0, repeats=spec.repeats, device=device,
                    min_time_s=spec.min_time_s, on_step=on_step)
    stats = Timing(timed.samples_ms, spec.warmup).stats()

    per_layer: list[LayerLatency] = []
    if spec.per_layer:
        ctx.progress("per_layer", 0.9, "timing each layer")
        per_layer = per_layer_latency(module, forward, device)

    batch = int(inputs[0].shape[0])  # input_shape's first dimension when one is given
    result = BenchmarkResult(
        model=model.name,
        backend=spec.backend,
        batch_size=batch,
        input_shapes=[list(t.shape) for t in inputs],
        parameters=model.parameter_count(),
        model_bytes=model.state_bytes(),
        latency=stats,
        throughput_per_s=batch / (stats.median_ms / 1e3),
        peak_memory_bytes=mem.peak_bytes,
        memory_method=mem.method,
        per_layer=per_layer,
        method=(f"torch eager, inference_mode, {spec.warmup} warm-up runs then {stats.repeats} "
                f"timed runs (at least {spec.repeats}"
                + (f" and {spec.min_time_s:g} s" if spec.min_time_s else "")
                + "), wall clock per run with device sync; median and p90"),
        environment=env.environment(device),
    )
    ctx.save_artifact("benchmark.json", result.model_dump_json(indent=2).encode(),
                      "application/json")
    ctx.progress("done", 1.0, f"median {stats.median_ms:.3f} ms")
    return result


def _inputs(spec: BenchmarkSpec, model: models.LoadedModel, ctx: JobContext
            ) -> tuple[torch.Tensor, ...]:
    if spec.input_shape:
        if len(model.input_names) != 1:
            raise UserError(f"`input_shape` fits single-input models; this one takes "
                            f"{model.input_names}: give a dataset instead")
        return (torch.randn(*spec.input_shape, generator=torch.Generator().manual_seed(0)),)
    if spec.dataset is not None:
        data = models.load_dataset(spec.dataset, ctx, model)
        tensors = data.ordered(model.input_names)
        if len(data) < spec.batch_size:
            raise UserError(f"the dataset has {len(data)} samples, fewer than batch_size "
                            f"{spec.batch_size}")
        return tuple(t[: spec.batch_size] for t in tensors)
    return model.sample(spec.batch_size)


def per_layer_latency(module: nn.Module, forward: object, device: torch.device
                      ) -> list[LayerLatency]:
    """Median wall time of each leaf module's forward over a few passes (hooks add a little
    overhead to every layer alike, so shares are comparable; totals are in the main latency)."""
    # torch.export's input guard check is a module of the program, not a layer of the model
    leaves = [(n, m) for n, m in module.named_modules()
              if n and not list(m.children()) and n != "_guards_fn"]
    times: dict[str, list[float]] = defaultdict(list)
    starts: dict[str, float] = {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    handles = []
    for name, mod in leaves:
        def pre(_m: nn.Module, _a: object, name: str = name) -> None:
            sync()
            starts[name] = time.perf_counter()

        def post(_m: nn.Module, _a: object, _o: object, name: str = name) -> None:
            sync()
            times[name].append((time.perf_counter() - starts[name]) * 1e3)

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    try:
        for _ in range(PER_LAYER_PASSES):
            forward()  # type: ignore[operator]
    finally:
        for h in handles:
            h.remove()
    # A module called k times per forward (a shared activation) counts k calls per pass.
    medians = {n: statistics.median(v) * len(v) / PER_LAYER_PASSES for n, v in times.items() if v}
    total = sum(medians.values()) or 1.0
    types = dict(leaves)
    return [LayerLatency(name=n, type=type(types[n]).__name__, median_ms=round(ms, 5),
                         share=round(ms / total, 4))
            for n, ms in sorted(medians.items(), key=lambda kv: -kv[1])]


def to_json(result: BenchmarkResult) -> str:
    return json.dumps(result.model_dump(mode="json"), indent=2)
