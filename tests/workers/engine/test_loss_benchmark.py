from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from app.schemas import LossBenchmarkResult, LossBenchmarkSpec
from gpu_kernels import loss_bench
from workers.engine import loss_benchmark
from workers.engine.context import JobCancelled, LocalContext, UserError


def test_loss_benchmark_table(tmp_path: Path) -> None:
    ctx = LocalContext(tmp_path)
    res = loss_benchmark.run(LossBenchmarkSpec(n=256, d=64, vocab_sizes=[4096], repeats=1,
                                               impls=["torch", "chunked"]), ctx)
    assert isinstance(res, LossBenchmarkResult)
    torch_row, ours = res.rows
    assert torch_row.error is None and ours.error is None
    assert torch_row.loss == pytest.approx(ours.loss, rel=1e-5)
    assert ours.peak_extra_bytes is not None and ours.time_ms is not None
    assert "| chunked | 256 | 64 | 4096 |" in res.table
    assert (tmp_path / "artifacts" / "loss_table.md").read_text().startswith("| impl |")


def test_oversized_materialized_baseline_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="GiB"):
        loss_benchmark.run(LossBenchmarkSpec(n=131072, d=64, vocab_sizes=[1_048_576],
                                             impls=["torch"]), LocalContext(tmp_path))
    # the fused path holds no N x V buffer, but its inputs and gradients (~144 GiB here) must fit
    with pytest.raises(UserError, match=r"inputs and their gradients alone need ~144\.0 GiB"):
        loss_benchmark.run(LossBenchmarkSpec(n=131072, d=16384, vocab_sizes=[1_048_576],
                                             impls=["chunked"]), LocalContext(tmp_path))
    with pytest.raises(UserError, match="CUDA"):
        loss_benchmark.run(LossBenchmarkSpec(impls=["triton"], device="cpu"),
                           LocalContext(tmp_path))
    with pytest.raises(UserError, match="'liger', 'cce_triton' run Triton kernels and need a CUDA"):
        loss_benchmark.run(LossBenchmarkSpec(impls=["chunked", "liger", "cce_triton"],
                                             device="cpu"), LocalContext(tmp_path))


def test_grad_diff_is_against_an_fp32_reference() -> None:
    """For bf16 inputs the column is the implementation's error against fp32 on the same values,
    not its distance to the materialized path run in bf16 too."""
    row = loss_bench.run_case("chunked", 64, 32, 512, "bfloat16", repeats=1)
    e, c, t = loss_bench.make_inputs(64, 32, 512, "bfloat16", "cpu")
    loss_bench.loss_fn("chunked")(e, c, t).backward()
    e32 = e.detach().float().requires_grad_()
    c32 = c.detach().float().requires_grad_()
    loss_bench.loss_fn("torch")(e32, c32, t).backward()
    assert e.grad is not None and c.grad is not None
    assert e32.grad is not None and c32.grad is not None
    expected = max((e.grad.float() - e32.grad).abs().max(), (c.grad.float() - c32.grad).abs().max())
    assert row.max_abs_grad_diff == pytest.approx(float(expected), rel=1e-6)
    assert row.max_abs_grad_diff is not None and row.max_abs_grad_diff > 0


def test_a_peer_that_is_not_installed_is_left_out_or_marked_not_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # the test extras install both peers: every default is there
    assert loss_bench.default_impls("cpu") == loss_bench.PEERS_CPU
    assert loss_bench.default_impls("cuda") == loss_bench.PEERS_GPU
    monkeypatch.setitem(loss_bench._PEER_MODULES, "cce_torch_compile", "no_such_package_here")
    assert loss_bench.default_impls("cpu") == ["torch", "chunked"]
    row = loss_bench.measure_case("cce_torch_compile", 8, 4, 16)
    assert row.time_ms is None and row.error is not None
    assert row.error.startswith("not run: no_such_package_here is not installed here")
    with caplog.at_level(logging.INFO, logger="modelpress"):
        res = loss_benchmark.run(LossBenchmarkSpec(n=16, d=8, vocab_sizes=[32], repeats=1),
                                 LocalContext(tmp_path))
    assert [r.impl for r in res.rows] == ["torch", "chunked"]
    assert "peer cce_torch_compile left out: no_such_package_here is not installed" in caplog.text


class _CancelledAfter(LocalContext):
    """A job cancelled ``after`` seconds in, whatever the engine is doing then."""

    def __init__(self, workdir: Path, after: float) -> None:
        super().__init__(workdir)
        self._at = time.monotonic() + after

    def check_cancelled(self) -> None:
        if time.monotonic() > self._at:
            raise JobCancelled()


def test_a_cancel_stops_the_case_that_is_running(tmp_path: Path) -> None:
    # one case of 100 forward + backward runs (about a minute here): the cancel must not wait for it
    spec = LossBenchmarkSpec(n=2048, d=256, vocab_sizes=[16384], repeats=100, impls=["torch"])
    start = time.monotonic()
    with pytest.raises(JobCancelled):
        loss_benchmark.run(spec, _CancelledAfter(tmp_path, 3))
    assert time.monotonic() - start < 10
