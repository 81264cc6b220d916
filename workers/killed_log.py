"""The log artifact of an attempt whose pool process Celery killed at the hard time limit: that
process never stored its own (``runner._save_log``), so the job kept only Redis's capped list.
Built from that list, the attempt's lines only, in a short-lived process
(``python -m workers.killed_log JOB_ID ATTEMPT``) that the worker's main process starts: the
main process opens no store of its own, as the pool processes it forks would inherit it."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from app import records
from workers import runner


def attempt_lines(lines: Sequence[str], attempt: int) -> list[str]:
    """The lines from the last start of ``attempt`` on (the job's log holds every attempt's);
    all of them when that start is no longer in the capped list."""
    marker = f" INFO attempt {attempt} on "
    starts = [i for i, line in enumerate(lines) if marker in line]
    return list(lines[starts[-1]:] if starts else lines)


def store(job_id: str, attempt: int) -> bool:
    """Whether the artifact was stored (not when the job is gone or has a later attempt)."""
    settings, r, objects = runner._services()
    h = r.hgetall(records.job_key(job_id))
    if not h or h.get("attempts") != str(attempt):
        return False
    lines = attempt_lines(r.lrange(records.log_key(job_id), 0, -1), attempt)
    note = (f"(rebuilt from the job's Redis log, which keeps its last {settings.log_lines_kept} "
            "lines: the attempt's process was killed before it could store its own log)")
    ctx = runner.WorkerContext(job_id, h["tenant"], attempt, settings, r, objects,
                               Path(tempfile.gettempdir()))
    runner._save_log(ctx, [note, *lines])
    return bool(r.hexists(records.artifacts_key(job_id), f"job-attempt{attempt}.log"))


def main(argv: Sequence[str]) -> int:
    job_id, attempt = argv
    return 0 if store(job_id, int(attempt)) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
