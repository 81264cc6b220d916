"""The plan that lets other workers compute pieces of a ``mixed_precision`` or ``sensitivity``
job: the inter-layer terms, in pieces of a few layers, the baseline searches, and the frontier's
re-measurements on the backend (each candidate realized and run on the evaluation data; its
latency is still timed by the job's own worker, all candidates together, after the pieces).

Only the job's own worker knows some inputs of those pieces: which layer takes which format at
each level (its latency gate measured that, with calibrated grids for static levels), and,
after the sensitivity stage, the orderings and the budget's threshold. It publishes them in the
job's memo, keyed by the run (attempt), and a piece reads them, builds the same task and
computes through the same memo: ``QuantTask.memoized`` claims each value, so every evaluation
is computed once, by whichever worker gets to it first, and the job's worker simply reads (or
waits for) what the pieces computed. The phase says which pieces are still useful: one that
arrives after its stage ended returns without loading the model, so it does not take CPU from
the job's frontier timing on a shared host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, Literal

from workers.engine.context import JobContext
from workers.engine.quant.formats import LayerFormat, from_json, to_json
from workers.engine.quant.task import Threshold

CHUNK = 8  # layers per inter-layer piece: each piece also pays a model load and one forward
Phase = Literal["sensitivity", "search", "frontier", "done"]
Orders = dict[str, list[tuple[str, list[str]]]]  # ordering -> [(level, layers in order)]


def _key(ctx: JobContext, what: str) -> str:
    return f"mp-{what}:{ctx.attempt}"


def publish_levels(ctx: JobContext, fmt_at: Mapping[str, Mapping[str, LayerFormat]],
                   threads: int) -> None:
    """Each level's per-layer formats, and the job's torch thread count: pieces compute with
    the same one, so a term never subtracts losses summed in different orders."""
    ctx.memo_put(_key(ctx, "levels"), {
        "threads": threads,
        "levels": {p: {n: to_json(f) for n, f in fmts.items()} for p, fmts in fmt_at.items()}})


def levels(ctx: JobContext) -> tuple[dict[str, dict[str, LayerFormat]], int] | None:
    raw = ctx.memo_get(_key(ctx, "levels"))
    if raw is None:
        return None
    return ({p: {n: from_json(f) for n, f in fmts.items()} for p, fmts in raw["levels"].items()},
            int(raw["threads"]))


def publish_searches(ctx: JobContext, limit: Threshold, orders: Orders) -> None:
    ctx.memo_put(_key(ctx, "searches"), {"limit": asdict(limit), "orders": orders})


def searches(ctx: JobContext) -> tuple[Threshold, Orders] | None:
    raw = ctx.memo_get(_key(ctx, "searches"))
    if raw is None:
        return None
    orders = {o: [(p, list(names)) for p, names in lv] for o, lv in raw["orders"].items()}
    return Threshold(**raw["limit"]), orders


def publish_frontier(ctx: JobContext, configs: Sequence[Mapping[str, LayerFormat]],
                     threads: int, keys: Sequence[str], hardware: str) -> None:
    """The frontier's candidates (the job's worker takes them front to back, pieces from the
    back), the job's torch thread count, the memo keys of the values a piece would compute
    (one that finds them all there returns before loading the model), and the hardware the
    re-measurements must come from."""
    ctx.memo_put(_key(ctx, "frontier"), {
        "threads": threads, "keys": list(keys), "hardware": hardware,
        "configs": [{n: to_json(f) for n, f in cfg.items()} for cfg in configs]})


def frontier(ctx: JobContext
             ) -> tuple[list[dict[str, LayerFormat]], int, list[str], str] | None:
    raw = ctx.memo_get(_key(ctx, "frontier"))
    if raw is None:
        return None
    return ([{n: from_json(f) for n, f in cfg.items()} for cfg in raw["configs"]],
            int(raw["threads"]), list(raw["keys"]), str(raw["hardware"]))


def set_phase(ctx: JobContext, phase: Phase) -> None:
    ctx.memo_put(_key(ctx, "phase"), phase)


def phase(ctx: JobContext) -> str | None:
    got = ctx.memo_get(_key(ctx, "phase"))
    return None if got is None else str(got)


def term_items(layers_at: Mapping[str, Sequence[str]], chunk: int = CHUNK
               ) -> list[dict[str, Any]]:
    """Pieces of the inter-layer terms, last first: the job's worker computes them front to
    back, the pieces from the back, and they meet in the middle."""
    items = [{"part": "terms", "level": p, "layers": list(names[i:i + chunk])}
             for p, names in layers_at.items() for i in range(0, len(names), chunk)]
    return items[::-1]
