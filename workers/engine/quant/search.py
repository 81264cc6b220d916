"""Search inside a budget: bisection along a sensitivity ordering, one precision level at a time.

At each level (e.g. fp32 -> int8, then int8 -> int4) the layers eligible for the lower precision
(those at the level above, or at fp32 where no level above is offered to them) are ordered
least-sensitive first, and bisection finds the largest k such that moving the first k
of them keeps the metric within the budget. Assuming the metric falls monotonically with k, this
costs about log2(n) evaluations per level. Greedy one-by-one is the quadratic baseline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from workers.engine.bisect import first_true
from workers.engine.quant.formats import LayerFormat
from workers.engine.quant.task import Config, Threshold


@dataclass
class Level:
    fmt_of: dict[str, LayerFormat]  # eligible layer -> its format at this level
    order: list[str]  # eligible layers, least sensitive first


def _movable(levels: Sequence[tuple[str, Level]], i: int, config: Mapping[str, LayerFormat]
             ) -> list[str]:
    """Level i's layers that may move down to it: those the search already moved to an earlier
    level, and those no earlier level offers (fp32 is their deepest: a latency gate or a missing
    kernel took the level above away from them)."""
    earlier = {n for _, lvl in levels[:i] for n in lvl.fmt_of}
    return [n for n in levels[i][1].order if n in config or n not in earlier]


@dataclass
class SearchOutcome:
    ordering: str
    config: Config
    metric: float
    boundaries: dict[str, int] = field(default_factory=dict)
    orders: dict[str, list[str]] = field(default_factory=dict)
    evaluations: int = 0
    seconds: float = 0.0


def bisect_boundary(ok: Callable[[int], bool], n: int, lo: int = 0) -> int:
    """Largest k in [lo, n] with ok(k), given ok(lo) and monotone ok (true then false)."""
    if ok(n):
        return n
    return first_true(lambda k: not ok(k), lo, n) - 1  # ok(lo) holds, ok(n) does not


def bisection_search(evaluate: Callable[[Mapping[str, LayerFormat]], float], limit: Threshold,
                     levels: Sequence[tuple[str, Level]], ordering: str, floor: int = 0
                     ) -> SearchOutcome:
    """``floor``: a boundary of the first level already known to hold (the bisection starts
    there instead of at 0: a recovered search above the plain one's boundary)."""
    t0 = time.perf_counter()
    config: Config = {}
    metric = limit.baseline
    boundaries: dict[str, int] = {}
    evals = 0
    for i, (name, level) in enumerate(levels):
        order = _movable(levels, i, config)
        cache: dict[int, float] = {}

        def cfg_at(k: int, order: list[str] = order, level: Level = level,
                   base: Config = config) -> Config:
            return {**base, **{n: level.fmt_of[n] for n in order[:k]}}

        known = min(floor, len(order)) if i == 0 else 0

        def ok(k: int, cache: dict[int, float] = cache, cfg_at: Callable[[int], Config] = cfg_at,
               known: int = known) -> bool:
            nonlocal evals
            if k <= known:
                return True
            if k not in cache:
                cache[k] = evaluate(cfg_at(k))
                evals += 1
            return limit.ok(cache[k])

        k = bisect_boundary(ok, len(order), known)
        boundaries[name] = k
        if k:
            config = cfg_at(k)
            if k not in cache:  # the floor, known to hold but not evaluated yet
                cache[k] = evaluate(config)
                evals += 1
            metric = cache[k]
    return SearchOutcome(ordering, config, metric, boundaries,
                         {name: lvl.order for name, lvl in levels}, evals,
                         time.perf_counter() - t0)


def greedy_search(evaluate: Callable[[Mapping[str, LayerFormat]], float], limit: Threshold,
                  levels: Sequence[tuple[str, Level]], max_evaluations: int) -> SearchOutcome:
    """Move, one at a time, the layer whose move hurts least, while the budget holds."""
    t0 = time.perf_counter()
    config: Config = {}
    metric = limit.baseline
    evals = 0
    boundaries: dict[str, int] = {}
    orders: dict[str, list[str]] = {}
    for i, (name, level) in enumerate(levels):
        remaining = _movable(levels, i, config)
        taken: list[str] = []
        while remaining and evals < max_evaluations:
            trials = []
            for n in remaining:
                if evals >= max_evaluations:
                    break
                trials.append((evaluate({**config, n: level.fmt_of[n]}), n))
                evals += 1
            good = [(m, n) for m, n in trials if limit.ok(m)]
            if not good:
                break
            m, best = max(good) if limit.higher_is_better else min(good)
            config = {**config, best: level.fmt_of[best]}
            metric = m
            taken.append(best)
            remaining.remove(best)
        boundaries[name] = len(taken)
        orders[name] = taken + remaining
    return SearchOutcome("greedy", config, metric, boundaries, orders, evals,
                         time.perf_counter() - t0)


def sweep(levels: Sequence[tuple[str, Level]], boundaries: Mapping[str, int], points: int
          ) -> list[Config]:
    """Configs along one ordering for the frontier: at each level, ``points`` evenly spaced
    boundaries, on top of the chosen boundaries of the levels before it."""
    out: list[Config] = []
    base: Config = {}
    for j, (name, level) in enumerate(levels):
        order = _movable(levels, j, base)
        ks = sorted({round(i * len(order) / (points - 1)) for i in range(points)})
        for k in ks:
            out.append({**base, **{m: level.fmt_of[m] for m in order[:k]}})
        base = {**base, **{m: level.fmt_of[m] for m in order[:boundaries.get(name, 0)]}}
    return out
