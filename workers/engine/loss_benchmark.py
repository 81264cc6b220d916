"""The ``loss_benchmark`` job: memory and time of linear + cross-entropy, materialized logits vs
fused implementations. :func:`measure` is the plain library function; :func:`run` is the job
engine around it. The measuring itself lives in :mod:`gpu_kernels.loss_bench` (shared with
``benchmarks/loss_memory.py``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from app.schemas import LossBenchmarkResult, LossBenchmarkSpec, LossRow
from gpu_kernels import loss_bench
from workers.engine import env
from workers.engine.context import JobContext, UserError

METHOD = ("each case in a fresh process; time: median of `repeats` forward + backward runs after "
          "one warm-up; peak extra memory: CPU, the kernel's resident-set high-water mark "
          "(VmHWM, reset via /proc/self/clear_refs) above the resident set before the run, "
          "glibc mmap threshold 64 KiB; CUDA, max_memory_allocated above the allocation before "
          "the run; both include the gradients; max abs grad diff: against the materialized "
          "fp32 reference on the same inputs, where it fits in memory")


def measure(n: int, d: int, vocab_sizes: Sequence[int], dtype: str = "float32",
            impls: Sequence[str] | None = None, repeats: int = 3,
            on_progress: Callable[[float, str], None] | None = None, device: str = "cpu",
            check_grads: bool = True) -> list[dict[str, Any]]:
    """Time and peak extra memory of ``mean CE(e @ c.T, t)`` forward + backward for every
    (vocabulary size, implementation), ``e (n, d)``, ``c (V, d)``.

    ``impls``: any of ``loss_bench.ALL_IMPLS`` (default: torch, chunked, cce_torch_compile on
    the CPU; adds triton, cce_triton, liger on CUDA; peers only where installed). Returns one
    dict per case with the keys of ``loss_bench.ROW_FIELDS``: impl, n, d, v, dtype, device,
    time_ms (median), peak_extra_bytes, loss, max_abs_grad_diff (None for ``torch`` and where
    the reference does not fit), error (None, or why the case has no figures: not run for lack
    of memory or a peer not installed, a peer that failed to import or run, a timeout).
    ``on_progress(fraction, message)`` is called before each case.
    """
    if impls is None:
        impls = loss_bench.default_impls(device)
    rows = loss_bench.measure_all(n, d, vocab_sizes, dtype, impls, repeats, device, check_grads,
                                  on_progress)
    return loss_bench.row_dicts(rows)


def run(spec: LossBenchmarkSpec, ctx: JobContext) -> LossBenchmarkResult:
    device = env.resolve_device(spec.device)
    impls = list(spec.impls or loss_bench.default_impls(device.type))
    if not spec.impls:
        for peer in (loss_bench.PEERS_GPU if device.type == "cuda" else loss_bench.PEERS_CPU):
            if peer not in impls:
                ctx.log.info("peer %s left out: %s", peer, loss_bench.missing_peer(peer))
    gpu_only = [i for i in impls if i not in loss_bench.PEERS_CPU]  # Triton kernels
    if gpu_only and device.type != "cuda":
        raise UserError(f"{', '.join(map(repr, gpu_only))} run Triton kernels and need a CUDA "
                        "worker (set device 'cuda'); on the CPU the fused implementation is "
                        "'chunked' and the peers are 'torch' and 'cce_torch_compile'")
    free = loss_bench.available_bytes(device.type)
    inputs = min(loss_bench.inputs_bytes(spec.n, spec.d, v, spec.dtype) for v in spec.vocab_sizes)
    if inputs > 0.8 * free:  # not even the smallest case's inputs fit: no case could run
        raise UserError(f"the inputs and their gradients alone need ~{inputs / 2**30:.1f} GiB "
                        f"(N x D and V x D), {free / 2**30:.1f} GiB are free: use smaller n, d "
                        "or vocab_sizes")
    need = max((loss_bench.case_bytes(i, spec.n, spec.d, v, spec.dtype) for i in impls
                for v in spec.vocab_sizes if loss_bench.materialized_bytes(i, spec.n, v)), default=0)
    if need > 0.8 * free:
        raise UserError(f"the materialized baseline needs ~{need / 2**30:.1f} GiB for N x V "
                        f"buffers, inputs and gradients, {free / 2**30:.1f} GiB are free: use "
                        "smaller sizes or drop 'torch' (and 'cce_torch_compile') from impls")

    def progress(fraction: float, message: str) -> None:
        ctx.progress("measure", fraction, message)

    rows = loss_bench.measure_all(spec.n, spec.d, spec.vocab_sizes, spec.dtype, impls,
                                  spec.repeats, device.type, on_progress=progress,
                                  check=ctx.check_cancelled)
    for r in rows:
        ctx.log.info("%s V=%d: %s ms, peak extra %s B%s", r.impl, r.v, r.time_ms,
                     r.peak_extra_bytes, f" ({r.error})" if r.error else "")
    md = "\n".join(loss_bench.table(rows))
    ctx.save_artifact("loss_table.md", (md + "\n").encode(), "text/markdown")
    ctx.progress("done", 1.0, f"{len(rows)} cases measured")
    return LossBenchmarkResult(rows=[LossRow(**d) for d in loss_bench.row_dicts(rows)], table=md,
                               method=METHOD, environment=env.environment(device))
