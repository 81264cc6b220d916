from __future__ import annotations

from pathlib import Path

import pytest

from app.schemas import LossBenchmarkResult, LossBenchmarkSpec
from workers.engine import loss_benchmark
from workers.engine.context import LocalContext, UserError


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
    with pytest.raises(UserError, match="CUDA"):
        loss_benchmark.run(LossBenchmarkSpec(impls=["triton"], device="cpu"),
                           LocalContext(tmp_path))
