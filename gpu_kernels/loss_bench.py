"""Measuring linear + cross-entropy implementations: time and peak extra memory of one forward
+ backward, each case in a fresh Python process so that one case's allocations (or allocator
caches, or a compile) cannot hide in another's. Used by ``benchmarks/loss_memory.py`` and the
``loss_benchmark`` job (``workers/engine/loss_benchmark.py``).

Memory, CPU: the kernel's resident-set high-water mark of the process (VmHWM, reset through
/proc/self/clear_refs just before the step) minus the resident set just before it; glibc is told
to mmap every allocation over 64 KiB (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident
set at once and the count is of live memory. The resident set is also sampled every millisecond
and the larger peak counts: in one CI run the high-water mark alone reported 0 for a 64 MiB
transient (tests/gpu_kernels/test_loss_bench.py), and where clear_refs is unavailable the
sampling is all there is.
CUDA: ``max_memory_allocated`` above the allocation before the step. Either way the figure
includes the gradients themselves (N x D + V x D).
Time: median over ``repeats`` forward + backward runs after one warm-up run.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

OURS = ["torch", "chunked", "triton"]
PEERS_CPU = ["torch", "chunked", "cce_torch_compile"]
PEERS_GPU = ["torch", "triton", "chunked", "cce_triton", "cce_torch_compile", "liger"]
ALL_IMPLS = [*OURS, "cce_triton", "cce_torch_compile", "liger"]
_PEER_MODULES = {"cce_triton": "cut_cross_entropy", "cce_torch_compile": "cut_cross_entropy",
                 "liger": "liger_kernel"}


def missing_peer(impl: str) -> str | None:
    """Why a peer cannot run here (its package is not installed), else None."""
    module = _PEER_MODULES.get(impl)
    if module is not None and importlib.util.find_spec(module) is None:
        return (f"{module} is not installed here (the peers come with "
                "`pip install -e '.[bench]'`)")
    return None


def default_impls(device: str) -> list[str]:
    """Ours and every peer installed here, for ``device``."""
    return [i for i in (PEERS_GPU if device == "cuda" else PEERS_CPU) if missing_peer(i) is None]

Progress = Callable[[float, str], None]


@dataclass
class Row:
    impl: str
    n: int
    d: int
    v: int
    dtype: str
    device: str
    time_ms: float | None = None
    peak_extra_bytes: int | None = None
    loss: float | None = None
    max_abs_grad_diff: float | None = None  # vs the materialized fp32 reference, same inputs
    error: str | None = None


def loss_fn(impl: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The mean cross-entropy of ``e @ c.T`` by one implementation (ours or a peer's)."""
    from gpu_kernels.linear_cross_entropy import linear_cross_entropy

    if impl in ("torch", "chunked", "triton"):
        return lambda e, c, t: linear_cross_entropy(e, c, t, impl=impl)  # type: ignore[arg-type]
    if impl in ("cce_triton", "cce_torch_compile"):
        from cut_cross_entropy import linear_cross_entropy as cce

        which = "cce" if impl == "cce_triton" else "torch_compile"
        return lambda e, c, t: cce(e, c, t, impl=which)  # type: ignore[no-any-return]
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        lce = LigerFusedLinearCrossEntropyLoss()
        return lambda e, c, t: lce(c, e, t)  # type: ignore[no-any-return]
    raise ValueError(f"unknown implementation {impl!r}; known: {', '.join(ALL_IMPLS)}")


def materialized_bytes(impl: str, n: int, v: int) -> int:
    """Rough peak of the implementations that hold N x V fp32 buffers (logits, log-softmax and
    its gradient for eager PyTorch; fewer for the compiled graph); 0 for the fused ones."""
    per = {"torch": 3, "cce_torch_compile": 2}.get(impl, 0)
    return per * n * v * 4


def inputs_bytes(n: int, d: int, v: int, dtype: str) -> int:
    """The inputs (N x D embeddings, V x D classifier) and their gradients, which every
    implementation, fused ones too, holds."""
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return 2 * (n + v) * d * itemsize


def case_bytes(impl: str, n: int, d: int, v: int, dtype: str) -> int:
    """What a case holds at least: its N x V buffers, its inputs and their gradients."""
    return materialized_bytes(impl, n, v) + inputs_bytes(n, d, v, dtype)


def available_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


# ---------------------------------------------------------------- peak memory (CPU)

_HWM = re.compile(r"VmHWM:\s+(\d+) kB")


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class PeakRss:
    """Peak resident set above its value at ``__enter__``, in bytes (see the module doc)."""

    def __init__(self) -> None:
        self.base = self.peak = 0
        self._hwm = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS to now
            return True
        except OSError:
            return False

    def __enter__(self) -> PeakRss:
        self.base = self.peak = _rss()
        self._hwm = self._reset_hwm()

        def sample() -> None:
            while not self._stop.wait(0.001):
                self.peak = max(self.peak, _rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._thread is not None
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        m = _HWM.search(Path("/proc/self/status").read_text()) if self._hwm else None
        if m:
            self.peak = max(self.peak, int(m.group(1)) * 1024)

    @property
    def extra(self) -> int:
        return max(0, self.peak - self.base)


# ---------------------------------------------------------------- one case

def make_inputs(n: int, d: int, v: int, dtype: str, device: str, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings ~ N(0, 0.5²), classifier ~ N(0, 0.02²) (a trained head's scale), uniform
    targets; deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    e = (torch.randn(n, d, generator=gen) * 0.5).to(device=device, dtype=dt)
    c = (torch.randn(v, d, generator=gen) * 0.02).to(device=device, dtype=dt)
    t = torch.randint(0, v, (n,), generator=gen).to(device)
    return e.requires_grad_(True), c.requires_grad_(True), t


def run_case(impl: str, n: int, d: int, v: int, dtype: str = "float32", device: str = "cpu",
             repeats: int = 3, check_grads: bool = True) -> Row:
    """One case in this process (:func:`measure_case` runs it in a fresh one)."""
    e, c, t = make_inputs(n, d, v, dtype, device)
    fn = loss_fn(impl)
    cuda = device == "cuda"

    def step() -> float:
        e.grad = c.grad = None
        loss = fn(e, c, t)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return float(loss.detach())

    step()  # warm-up: compiles where the implementation compiles, loads libraries
    e.grad = c.grad = None
    times = []
    for i in range(repeats):
        if i == 0:  # memory of the first timed run (the measuring costs no time)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            with PeakRss() as rss:
                t0 = time.perf_counter()
                loss = step()
                times.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated() - base if cuda else rss.extra
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    row = Row(impl, n, d, v, dtype, device, round(statistics.median(times) * 1e3, 3), int(peak),
              loss)
    need = materialized_bytes("torch", n, v)
    if check_grads and impl != "torch" and need < 0.5 * available_bytes(device):
        assert e.grad is not None and c.grad is not None
        ge, gc = e.grad, c.grad
        e.grad = c.grad = None
        # the reference runs in fp32 on the same values: for bf16 / fp16 inputs the column is
        # the implementation's own error, not its distance to a materialized bf16 / fp16 run
        e32 = e.detach().float().requires_grad_()
        c32 = c.detach().float().requires_grad_()
        loss_fn("torch")(e32, c32, t).backward()
        assert e32.grad is not None and c32.grad is not None
        row.max_abs_grad_diff = float(max((ge.float() - e32.grad).abs().max(),
                                          (gc.float() - c32.grad).abs().max()))
    return row


def _child_main(args: str, parent: int) -> None:
    """A case's process: dies with ``parent`` (below), runs the case, prints its row."""
    _die_with(parent)
    print("ROW" + json.dumps(asdict(run_case(*json.loads(args)))))


def _die_with(parent: int) -> None:
    """SIGKILL this process when ``parent`` ends (Linux; elsewhere nothing). ``subprocess.run``
    kills its child when the caller raises, not when the caller is killed: a worker pool process
    killed by a forced cancel or a hard time limit left its case running on, a core busy for
    up to the case's 30-minute limit with nobody to read the result."""
    if not sys.platform.startswith("linux"):
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # it ended before the line above: nothing will signal us
        os._exit(1)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def measure_case(impl: str, n: int, d: int, v: int, dtype: str = "float32", device: str = "cpu",
                 repeats: int = 3, check_grads: bool = True, timeout_s: float = 1800,
                 check: Callable[[], None] | None = None) -> Row:
    """Run one case in a fresh Python process. A case whose materialized buffers would not fit
    in the free memory is not run, nor a peer that is not installed; failures come back as a row
    with ``error``. ``check`` is called every second while the case runs; what it raises (a
    job's cancel) ends the case's process and propagates."""
    missing = missing_peer(impl)
    if missing is not None:
        return Row(impl, n, d, v, dtype, device, error=f"not run: {missing}")
    need = case_bytes(impl, n, d, v, dtype)
    free = available_bytes(device)
    if need > 0.8 * free:
        return Row(impl, n, d, v, dtype, device, error=(
            f"not run: needs ~{need / 2**30:.1f} GiB (N x V buffers, inputs and gradients), "
            f"{free / 2**30:.1f} GiB free"))
    args = json.dumps([impl, n, d, v, dtype, device, repeats, check_grads])
    code = ("import sys; from gpu_kernels.loss_bench import _child_main; "
            f"_child_main(sys.argv[1], {os.getpid()})")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    # a session of its own: a kill reaches whatever it started too (torch.compile's workers),
    # which would otherwise hold its pipes open and the communicate() below with them
    proc = subprocess.Popen([sys.executable, "-c", code, args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=root,
                            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                stdout, stderr = proc.communicate(timeout=1.0)
                break
            except subprocess.TimeoutExpired:  # output is kept for the next communicate()
                if time.monotonic() > deadline:
                    return Row(impl, n, d, v, dtype, device,
                               error=f"over the {timeout_s:.0f} s time limit")
                if check is not None:
                    check()
    finally:
        if proc.returncode is None:  # time limit, or check() / a signal handler raised
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    for line in stdout.splitlines():
        if line.startswith("ROW"):
            return Row(**json.loads(line[3:]))
    lines = stderr.strip().splitlines() or [f"exit status {proc.returncode}, no output"]
    if proc.returncode < 0:
        lines.append(f"killed by signal {-proc.returncode}")
    return Row(impl, n, d, v, dtype, device, error=lines[-1][:300])


def measure_all(n: int, d: int, vocab_sizes: Sequence[int], dtype: str, impls: Sequence[str],
                repeats: int, device: str = "cpu", check_grads: bool = True,
                on_progress: Progress | None = None,
                check: Callable[[], None] | None = None) -> list[Row]:
    """Every (vocabulary size, implementation) case, in that order; ``check`` as in
    :func:`measure_case`."""
    for impl in impls:
        if impl not in ALL_IMPLS:
            raise ValueError(f"unknown implementation {impl!r}; known: {', '.join(ALL_IMPLS)}")
    cases = [(v, impl) for v in vocab_sizes for impl in impls]
    rows: list[Row] = []
    for i, (v, impl) in enumerate(cases):
        if on_progress is not None:
            done = f"; last: {summary(rows[-1])}" if rows else ""
            on_progress(i / len(cases), f"{impl} at V={v} ({i + 1}/{len(cases)}){done}")
        rows.append(measure_case(impl, n, d, v, dtype, device, repeats, check_grads,
                                 check=check))
    if on_progress is not None:
        last = f"; last: {summary(rows[-1])}" if rows else ""
        on_progress(1.0, f"{len(cases)} cases measured{last}")
    return rows


def summary(r: Row) -> str:
    """One finished case in a line: a run cut short still leaves its figures in the log."""
    if r.error or r.time_ms is None or r.peak_extra_bytes is None:
        return f"{r.impl} V={r.v}: {r.error or 'no result'}"
    return f"{r.impl} V={r.v}: {r.time_ms:.1f} ms, {r.peak_extra_bytes / 2**20:.1f} MiB extra"


def table(rows: Sequence[Row]) -> list[str]:
    """Markdown lines: each row with its time and memory relative to the materialized
    baseline (``torch``) of the same size."""
    base = {(r.n, r.d, r.v, r.dtype): r for r in rows if r.impl == "torch" and r.error is None}
    lines = ["| impl | N | D | V | dtype | fwd+bwd ms | x torch | peak extra MiB | x torch | "
             "loss | max abs grad diff |", "|" + " --- |" * 11]
    for r in rows:
        head = f"| {r.impl} | {r.n} | {r.d} | {r.v} | {r.dtype} |"
        if r.error or r.time_ms is None or r.peak_extra_bytes is None or r.loss is None:
            lines.append(f"{head} {r.error or 'no result'} | | | | | |")
            continue
        b = base.get((r.n, r.d, r.v, r.dtype))
        tx = f"{r.time_ms / b.time_ms:.2f}" if b and b.time_ms else "-"
        mx = f"{r.peak_extra_bytes / b.peak_extra_bytes:.3f}" if b and b.peak_extra_bytes else "-"
        gd = "-" if r.max_abs_grad_diff is None else f"{r.max_abs_grad_diff:.1e}"
        lines.append(f"{head} {r.time_ms:.0f} | {tx} | {r.peak_extra_bytes / 2**20:.1f} | {mx} | "
                     f"{r.loss:.5f} | {gd} |")
    return lines


def row_dicts(rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


ROW_FIELDS = [f.name for f in fields(Row)]
