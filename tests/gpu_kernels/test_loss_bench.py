"""The loss-benchmark measuring helpers: peak-memory accounting, one case in a fresh process,
failures as rows, the table, and the job's library function."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from gpu_kernels import loss_bench
from gpu_kernels.loss_bench import PeakRss, Row, measure_case, table


def test_peak_rss_sees_a_transient_allocation() -> None:
    with PeakRss() as before:
        pass
    with PeakRss() as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched, then freed inside the block
        # Held for 50 sampling periods: the sampler alone must see it. (Freed at once, the
        # kernel's high-water mark caught it on every run here, but one CI run saw neither.)
        time.sleep(0.05)
        del x
    assert 60 * 2**20 <= mem.extra <= 80 * 2**20, mem.extra
    assert before.extra < 8 * 2**20


def test_cases_in_fresh_processes() -> None:
    """The materialized and the chunked path on one small size: same loss, same gradients
    (compared inside the chunked case's process), less memory for the chunked one; a missing
    peer and an oversized case come back as rows that say why."""
    n, d, v = 512, 32, 8192  # logits: 16 MiB
    ref = measure_case("torch", n, d, v, repeats=1)
    ours = measure_case("chunked", n, d, v, repeats=1)
    assert ref.error is None and ours.error is None, (ref.error, ours.error)
    assert ref.loss is not None and ours.loss == pytest.approx(ref.loss, rel=1e-6)
    assert ref.time_ms is not None and ref.time_ms > 0
    assert ours.max_abs_grad_diff is not None and ours.max_abs_grad_diff < 1e-6
    assert ref.peak_extra_bytes is not None and ours.peak_extra_bytes is not None
    assert ref.peak_extra_bytes >= 2 * n * v * 4  # logits and their gradient, at least
    assert ours.peak_extra_bytes < ref.peak_extra_bytes / 2
    huge = measure_case("torch", 1 << 20, 8, 1 << 20)
    assert huge.error is not None and huge.error.startswith(
        "not run: needs ~12288.1 GiB (N x V buffers, inputs and gradients)")


def _is_case(pid: int) -> bool:
    try:
        return b"gpu_kernels.loss_bench" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan is reaped by whatever init this machine has, if any)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_case_process_dies_with_the_process_that_started_it() -> None:
    """A worker pool process killed mid-case (a forced cancel, a hard time limit) must not leave
    its case running: one such orphan held a CI core for 13 minutes."""
    root = Path(__file__).resolve().parents[2]
    code = ("from gpu_kernels.loss_bench import measure_case; "
            "measure_case('torch', 2048, 256, 16384, repeats=10000, check_grads=False)")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=root)
    children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
    try:
        deadline = time.monotonic() + 60
        while not (kids := children.read_text().split()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert kids, "the case process never started"
        case = int(kids[0])
        time.sleep(3)  # past its imports: a case measuring, not one starting
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while (alive := _running(case)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive:
            os.kill(case, signal.SIGKILL)
        assert not alive, "the case process outlived the process that started it"
    finally:
        parent.kill()


def test_a_check_that_raises_ends_the_running_case() -> None:
    """A job's cancel reaches a case that is running (each may take minutes), not the next."""
    kids = Path(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/children")
    seen: list[int] = []
    leaders: list[bool] = []
    start = time.monotonic()

    def check() -> None:
        # the case's process, not the session's other children (redis-server, zoo training)
        seen.extend(pid for pid in map(int, kids.read_text().split()) if _is_case(pid))
        # a session of its own, so the kill reaches what the case started (compile workers)
        leaders.extend(os.getsid(pid) == pid for pid in seen if _running(pid))
        if time.monotonic() - start > 3:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt, match="cancelled"):
        measure_case("torch", 2048, 256, 16384, repeats=10000, check_grads=False, check=check)
    assert time.monotonic() - start < 10
    assert seen and not any(_running(pid) for pid in set(seen))
    assert leaders and all(leaders)


def test_a_failing_peer_is_a_row_not_an_exception() -> None:
    # cut-cross-entropy's Triton kernel needs a CUDA driver; without one its case fails.
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    row = measure_case("cce_triton", 64, 16, 256, repeats=1)
    assert row.time_ms is None and row.error
    with pytest.raises(ValueError, match="unknown implementation"):
        loss_bench.measure_all(8, 8, [16], "float32", ["nope"], 1)


def test_table_ratios_against_the_materialized_row() -> None:
    rows = [Row("torch", 8, 4, 16, "float32", "cpu", 10.0, 4 * 2**20, 2.5),
            Row("chunked", 8, 4, 16, "float32", "cpu", 15.0, 2**20, 2.5, 1e-8),
            Row("cce_torch_compile", 8, 4, 16, "float32", "cpu", error="ImportError: x")]
    lines = table(rows)
    assert lines[0].startswith("| impl | N | D | V |")
    assert lines[2] == "| torch | 8 | 4 | 16 | float32 | 10 | 1.00 | 4.0 | 1.000 | 2.50000 | - |"
    assert lines[3] == ("| chunked | 8 | 4 | 16 | float32 | 15 | 1.50 | 1.0 | 0.250 | 2.50000 "
                        "| 1.0e-08 |")
    assert lines[4].startswith("| cce_torch_compile | 8 | 4 | 16 | float32 | ImportError: x |")


def test_job_library_function_reports_progress() -> None:
    from workers.engine.loss_benchmark import measure

    seen: list[tuple[float, str]] = []
    rows = measure(128, 16, [1024], "float32", ["chunked"], 1,
                   on_progress=lambda f, m: seen.append((f, m)))
    assert [r["impl"] for r in rows] == ["chunked"] and set(rows[0]) == set(loss_bench.ROW_FIELDS)
    assert rows[0]["error"] is None and rows[0]["max_abs_grad_diff"] < 1e-6
    assert seen[0][0] == 0.0 and seen[-1][0] == 1.0
