"""Finding d_int90, the smallest subspace dimension whose solution reaches 90% of the full
model's accuracy. The paper trains at every d of a grid; training runs are the cost, so here a
galloping search doubles d from the bottom of the grid until a run passes, then bisects between
the last failure and the first success on the grid (about 2 log2(grid size) runs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from workers.engine.bisect import first_true


@dataclass
class SearchResult:
    d_int: int | None
    runs: dict[int, float] = field(default_factory=dict)  # d -> accuracy, in the order run


def grid_sweep(run: Callable[[int], float], grid: Sequence[int], target: float) -> SearchResult:
    res = SearchResult(None)
    for d in grid:
        res.runs[d] = run(d)
    passing = [d for d in grid if res.runs[d] >= target]
    res.d_int = min(passing) if passing else None
    return res


def gallop_bisect(run: Callable[[int], float], grid: Sequence[int], target: float) -> SearchResult:
    """Smallest grid value with run(d) >= target, assuming success is monotone in d."""
    res = SearchResult(None)

    def ok(i: int) -> bool:
        d = grid[i]
        if d not in res.runs:
            res.runs[d] = run(d)
        return res.runs[d] >= target

    i, prev, step = 0, -1, 1  # grid[prev] failed (-1: below the grid); probe grid[i]
    while not ok(i):
        if i == len(grid) - 1:
            return res  # nothing on the grid reaches the target
        prev, i, step = i, min(i + step, len(grid) - 1), step * 2
    hi = first_true(ok, prev, i)
    res.d_int = grid[hi]
    return res
