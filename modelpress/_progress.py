"""Job progress on the terminal: a bar on a TTY; otherwise (logs, pipes) one line per stage or
state change, and within a long stage a line at most every ``interval`` seconds."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm

from app.schemas import JobEvent


class ProgressPrinter:
    def __init__(self, job_id: str, interval: float = 30.0) -> None:
        self._job = job_id[:12]
        self._interval = interval
        self._last_line = 0.0
        self._tty = sys.stderr.isatty()
        self._bar: tqdm[Any] | None = None
        if self._tty:
            self._bar = tqdm(total=100, desc=self._job, unit="%", file=sys.stderr,
                             bar_format="{desc} {bar} {n:.0f}% {postfix}", dynamic_ncols=True)
        self._last_stage = ""

    def _line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def show(self, event: JobEvent) -> None:
        if event.type == "progress" and event.progress is not None:
            p = event.progress
            if self._bar is not None:
                self._bar.n = round(p.fraction * 100, 1)
                self._bar.set_postfix_str(f"{p.stage}: {p.message}"[:70])
            elif p.stage != self._last_stage or (
                    time.monotonic() - self._last_line >= self._interval):
                # A sensitivity stage can run for minutes: say it is alive, not every probe.
                self._line(f"{self._job} {p.fraction:4.0%} {p.stage}: {p.message}"[:200])
                self._last_line = time.monotonic()
            self._last_stage = p.stage
        elif event.type == "state" and event.state:
            if self._bar is not None:
                self._bar.set_postfix_str(event.state)
                if event.state == "succeeded":
                    self._bar.n = 100
            else:
                self._line(f"{self._job} state {event.state}")
        elif event.type == "log" and event.message:
            self._line(f"  {event.message}"[:200])
        if self._bar is not None:
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
