"""What ``modelpress jobs submit --wait`` prints when its output is not a terminal (CI logs,
pipes): every stage change, and within a long stage a line at most every ``interval`` s."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from app.schemas import JobEvent, Progress
from modelpress._progress import ProgressPrinter


def _progress(i: int, stage: str, message: str) -> JobEvent:
    return JobEvent(id=str(i), type="progress", job_id="job_0123456789ab", at=datetime.now(UTC),
                    progress=Progress(stage=stage, fraction=i / 10, message=message))


EVENTS = [_progress(1, "load", "loading"), _progress(2, "sensitivity", "probe 1/3"),
          _progress(3, "sensitivity", "probe 2/3"), _progress(4, "sensitivity", "probe 3/3"),
          _progress(5, "search", "bisection")]


def _printed(interval: float, capsys: pytest.CaptureFixture[str]) -> list[str]:
    printer = ProgressPrinter("job_0123456789ab", interval=interval)
    for event in EVENTS:
        printer.show(event)
    printer.close()
    return capsys.readouterr().err.splitlines()


def test_stage_changes_only_within_the_interval(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _printed(3600.0, capsys)
    assert [ln.split(": ")[1] for ln in lines] == ["loading", "probe 1/3", "bisection"], lines


def test_long_stage_repeats_a_line_after_the_interval(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _printed(0.0, capsys)
    assert [ln.split(": ")[1] for ln in lines] == ["loading", "probe 1/3", "probe 2/3",
                                                  "probe 3/3", "bisection"], lines
    assert lines[2].startswith("job_01234567  30% sensitivity"), lines
