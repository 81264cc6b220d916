"""The ``loss_benchmark`` job: linear + cross-entropy, materialized logits vs fused kernels."""

from __future__ import annotations

from dataclasses import asdict

import psutil
import torch

from app.schemas import LossBenchmarkResult, LossBenchmarkSpec, LossRow
from gpu_kernels.loss_bench import PEERS_CPU, PEERS_GPU, measure, table
from workers.engine import env
from workers.engine.context import JobContext, UserError


def run(spec: LossBenchmarkSpec, ctx: JobContext) -> LossBenchmarkResult:
    device = env.resolve_device(spec.device)
    impls = list(spec.impls or (PEERS_GPU if device.type == "cuda" else PEERS_CPU))
    if "triton" in impls and device.type != "cuda":
        raise UserError("impl 'triton' needs a CUDA worker (set device 'cuda'); on the CPU the "
                        "chunked path is the fused implementation")
    if "torch" in impls:
        need = 2 * spec.n * max(spec.vocab_sizes) * 4  # logits and their gradient, fp32
        have = (torch.cuda.mem_get_info()[0] if device.type == "cuda"
                else psutil.virtual_memory().available)
        if need > 0.8 * have:
            raise UserError(f"the materialized baseline needs ~{need / 2**30:.1f} GiB for N x V "
                            f"logits and their gradient, {have / 2**30:.1f} GiB are free: use "
                            "smaller sizes or drop 'torch' from impls")
    rows: list[LossRow] = []
    cases = [(v, impl) for v in spec.vocab_sizes for impl in impls]
    for i, (v, impl) in enumerate(cases):
        ctx.progress("measure", i / len(cases), f"{impl} at V={v} ({i + 1}/{len(cases)})")
        row = measure(impl, spec.n, spec.d, v, spec.dtype, device.type, spec.repeats)
        ctx.log.info("%s V=%d: %s ms, peak extra %s B%s", impl, v, row.time_ms,
                     row.peak_extra_bytes, f" ({row.error})" if row.error else "")
        rows.append(LossRow(**asdict(row)))
    from gpu_kernels.loss_bench import Row

    md = "\n".join(table([Row(**r.model_dump()) for r in rows]))
    result = LossBenchmarkResult(
        rows=rows, table=md,
        method=("each case in a fresh process; median of the timed forward + backward runs "
                "after one warm-up; peak extra memory = resident-set high-water mark above the "
                "inputs (CPU, sampled every 1 ms, glibc mmap threshold 64 KiB) or "
                "max_memory_allocated above the inputs (CUDA)"),
        environment=env.environment(device))
    ctx.save_artifact("loss_table.md", (md + "\n").encode(), "text/markdown")
    ctx.progress("done", 1.0, f"{len(rows)} cases measured")
    return result
