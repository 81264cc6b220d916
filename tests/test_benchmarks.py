"""The benchmark scripts' own plumbing, without running a benchmark: argument types that refuse a
bad value at parse time (before minutes of training), the percentile of ``load.py``, the error
``allocator.py`` gives when its timing process fails. Each test takes a second or two."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402


def test_argument_types_refuse_bad_values_with_a_message() -> None:
    assert _common.positive_int("3") == 3
    assert _common.int_list("1,4,32") == [1, 4, 32]
    assert _common.float_list("0.9,0.1") == [0.9, 0.1]
    assert _common.name_list(("a", "b"))("b,a") == ["b", "a"]
    assert _common.name_list(("a", "b"))("") == []
    for parse, text, says in [(_common.positive_int, "0", "not >= 1"),
                              (_common.positive_int, "x", "not an integer"),
                              (_common.int_list, "1,x", "comma-separated list of integers"),
                              (_common.float_list, "0.5,y", "comma-separated list of numbers"),
                              (_common.name_list(("a", "b")), "a,c", "unknown 'c'")]:
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            parse(text)


def test_help_keeps_the_docstrings_usage_lines() -> None:
    doc = "Title line.\n\n    python benchmarks/x.py [--n 3]\n\n- a list item\n"
    text = _common.parser(doc).format_help()
    assert "\n    python benchmarks/x.py [--n 3]\n" in text and "\n- a list item\n" in text


def test_versions_line_names_python_and_each_package() -> None:
    line = _common.versions("torch", "no-such-package-xyz")
    assert line.startswith("Python 3.") and "torch " in line
    assert "no-such-package-xyz not installed" in line


def test_load_p99_is_the_nearest_rank() -> None:
    import load

    values = [float(v) for v in range(1, 101)]
    assert load.pct(values, 0.99) == 99.0  # was 100.0: index int(0.99 * 100) = 99, the maximum
    assert load.pct(values, 0.5) == 50.0
    assert load.pct([7.0], 0.99) == 7.0
    assert load.pct([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0


def test_allocator_shows_why_its_timing_process_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    import allocator

    monkeypatch.setattr(allocator, "CHILD", "import sys; sys.exit('the child says why')")
    with pytest.raises(SystemExit, match="the child says why"):
        allocator.run(False, 1)


BAD_FLAGS = [
    # each of these used to fail only after a long run (or with a bare traceback)
    ("few_step_ablation.py", ["--skips", "4,64"], "each skip must be in 1..32"),
    ("mixed_precision.py", ["--models", "digits-cnn,digits-cnm"], "unknown 'digits-cnm'"),
    ("mixed_precision.py", ["--rounds", "0"], "--rounds: 0 is not >= 1"),
    ("intrinsic_dimension.py", ["--seeds", "0,1,x"], "comma-separated list of integers"),
    ("few_step_distill.py", ["--students", "full,lorra"], "unknown 'lorra'"),
    ("spiking.py", ["--steps", "5"], "greater than or equal to 10"),
    ("qmatmul.py", ["--shapes", "16x4096"], "is not MxKxN"),
    ("load.py", ["--submitters", "0"], "--submitters: 0 is not >= 1"),
]


def test_bad_flags_fail_at_once_with_a_usage_error() -> None:
    # all at once: each process spends its ~2.5 s importing torch and the engine
    procs = [(script, says, subprocess.Popen(
        [sys.executable, str(BENCH / script), *args], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)) for script, args, says in BAD_FLAGS]
    for script, says, proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (script, err[-2000:])  # argparse's usage error
        assert says in err and "Traceback" not in err, (script, err[-2000:])
