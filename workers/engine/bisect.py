"""The one bisection both searches use (precision boundaries, subspace dimensions)."""

from __future__ import annotations

from collections.abc import Callable


def first_true(pred: Callable[[int], bool], lo: int, hi: int) -> int:
    """Smallest i in (lo, hi] with pred(i), given pred(hi) holds, pred(lo) does not (lo may be
    a sentinel below the range) and pred is monotone (false then true)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid
    return hi
