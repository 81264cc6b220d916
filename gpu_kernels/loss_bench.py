"""Measuring the linear cross-entropy implementations: time and peak extra memory of one
forward + backward, each case in a fresh process so allocations of one cannot hide in another.

Memory: on the CPU, the process's resident set sampled every millisecond during the timed run,
minus its value just before (glibc is told to mmap every allocation over 64 KiB, so freed
tensors leave the resident set at once); on CUDA, ``max_memory_allocated`` above the inputs.
Used by ``benchmarks/loss_memory.py`` and the ``loss_benchmark`` job.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

PEERS_CPU = ["torch", "chunked", "cce_torch_compile"]
PEERS_GPU = ["torch", "triton", "chunked", "cce_triton", "cce_torch_compile", "liger"]


@dataclass
class Row:
    impl: str
    n: int
    d: int
    v: int
    dtype: str
    device: str
    time_ms: float | None
    peak_extra_bytes: int | None
    loss: float | None
    error: str | None = None


def _loss_fn(impl: str) -> Callable[..., torch.Tensor]:
    from gpu_kernels.linear_cross_entropy import linear_cross_entropy

    if impl in ("torch", "chunked", "triton"):
        return lambda e, c, t: linear_cross_entropy(e, c, t, impl=impl)  # type: ignore[arg-type]
    if impl.startswith("cce_"):
        from cut_cross_entropy import linear_cross_entropy as cce

        which = impl.removeprefix("cce_")
        return lambda e, c, t: cce(e, c, t, impl=which)
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        lce = LigerFusedLinearCrossEntropyLoss()
        return lambda e, c, t: lce(c, e, t)
    raise ValueError(f"unknown implementation {impl!r}")


class _RssPeak:
    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.stop = threading.Event()
        self.base = self.peak = self.proc.memory_info().rss

    def __enter__(self) -> _RssPeak:
        self.base = self.peak = self.proc.memory_info().rss

        def sample() -> None:
            while not self.stop.wait(0.001):
                self.peak = max(self.peak, self.proc.memory_info().rss)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def run_case(impl: str, n: int, d: int, v: int, dtype: str, device: str, repeats: int) -> Row:
    """One case, in this process (call it through :func:`measure` to get a fresh process)."""
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    dev = torch.device(device)
    e = (torch.randn(n, d, device=dev) * 0.5).to(dt).requires_grad_(True)
    c = (torch.randn(v, d, device=dev) * 0.02).to(dt).requires_grad_(True)
    t = torch.randint(0, v, (n,), device=dev)
    fn = _loss_fn(impl)

    def step() -> float:
        e.grad = c.grad = None
        loss = fn(e, c, t)
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    loss = step()  # warm-up (compiles where the implementation compiles)
    e.grad = c.grad = None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with _RssPeak() as mem:
            step()
        peak = mem.peak - mem.base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return Row(impl, n, d, v, dtype, device, statistics.median(times), int(peak), loss)


def measure(impl: str, n: int, d: int, v: int, dtype: str = "float32", device: str = "cpu",
            repeats: int = 3, timeout_s: float = 1800) -> Row:
    """Run one case in a fresh Python process; failures come back as a row with ``error``."""
    code = ("import json, sys; from dataclasses import asdict; "
            "from gpu_kernels.loss_bench import run_case; "
            f"print('ROW' + json.dumps(asdict(run_case({impl!r}, {n}, {d}, {v}, {dtype!r}, "
            f"{device!r}, {repeats}))))")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Row(impl, n, d, v, dtype, device, None, None, None, error=f"over {timeout_s} s")
    for line in out.stdout.splitlines():
        if line.startswith("ROW"):
            return Row(**json.loads(line[3:]))
    err = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return Row(impl, n, d, v, dtype, device, None, None, None, error=err[:300])


def table(rows: list[Row]) -> list[str]:
    """Markdown: each row with its ratios to the materialized baseline of the same size."""
    base = {(r.n, r.d, r.v, r.dtype): r for r in rows if r.impl == "torch" and r.error is None}
    lines = ["| impl | N | D | V | dtype | fwd+bwd ms | x torch | peak extra MB | x torch | "
             "loss |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        b = base.get((r.n, r.d, r.v, r.dtype))
        if r.error:
            lines.append(f"| {r.impl} | {r.n} | {r.d} | {r.v} | {r.dtype} | failed: {r.error} "
                         "| | | | |")
            continue
        assert r.time_ms is not None and r.peak_extra_bytes is not None and r.loss is not None
        tx = f"{r.time_ms / b.time_ms:.2f}" if b and b.time_ms else ""
        mx = (f"{r.peak_extra_bytes / b.peak_extra_bytes:.3f}"
              if b and b.peak_extra_bytes else "")
        lines.append(f"| {r.impl} | {r.n} | {r.d} | {r.v} | {r.dtype} | {r.time_ms:.1f} | {tx} | "
                     f"{r.peak_extra_bytes / 2**20:.1f} | {mx} | {r.loss:.5f} |")
    return lines


def rows_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
