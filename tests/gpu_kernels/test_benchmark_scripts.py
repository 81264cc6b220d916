"""The kernel benchmarks still run and print their tables (at toy sizes: the figures are not
checked here, only that each script works end to end against the kernels' current API)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, out: Path) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args,
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out.read_text()


def test_loss_memory_prints_a_row_per_implementation_and_size(tmp_path: Path) -> None:
    table = _run("loss_memory.py", "--n", "64", "--d", "32", "--v", "256,512", "--repeats", "1",
                 "--impls", "torch", out=tmp_path / "loss.md")
    rows = [line for line in table.splitlines() if line.startswith("| torch |")]
    assert len(rows) == 2, table
    assert all("| 64 | 32 |" in row for row in rows)


def test_qmatmul_prints_the_kernels_beside_the_gemms(tmp_path: Path) -> None:
    table = _run("qmatmul.py", "--shapes", "4x64x64", "--group", "32", "--repeats", "2",
                 out=tmp_path / "q.md")
    assert "| 4x64x64 | bf16 GEMM |" in table and "_weight_int4pack_mm_for_cpu g32" in table
    # the command line reproduces the run (every flag), the environment line says where it ran
    assert "`python benchmarks/qmatmul.py --shapes 4x64x64 --group 32 --repeats 2`" in table
    assert "Python 3." in table and "torch " in table
    assert torch.cuda.is_available() or " threads;" in table
