"""The log artifact of an attempt killed at the hard time limit holds that attempt's lines."""

from __future__ import annotations

from workers.killed_log import attempt_lines

LOG = ["t0 INFO attempt 1 on w1@h", "t1 INFO first try", "t2 INFO attempt 2 on w2@h",
       "t3 WARNING retrying: an earlier attempt did not finish", "t4 ERROR killed"]


def test_the_lines_from_the_attempts_start_on() -> None:
    assert attempt_lines(LOG, 2) == LOG[2:]
    assert attempt_lines(LOG, 1) == LOG  # attempt 1's start, then all that follows
    # the start fell out of the capped list: every line kept is the attempt's or later
    assert attempt_lines(LOG[3:], 2) == LOG[3:]
    # "attempt 1 on" must not match "attempt 12 on"
    assert attempt_lines(["x INFO attempt 12 on w", "y"], 1) == ["x INFO attempt 12 on w", "y"]
    assert attempt_lines(["a", "x INFO attempt 12 on w", "y"], 12) == ["x INFO attempt 12 on w", "y"]
