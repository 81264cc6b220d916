"""Job kind -> engine function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from app.schemas import AnySpec
from workers.engine import benchmark
from workers.engine.context import JobContext

ENGINES: dict[str, Callable[[Any, JobContext], BaseModel]] = {
    "benchmark": benchmark.run,
}


def run(spec: AnySpec, ctx: JobContext) -> BaseModel:
    kind = spec.kind
    return ENGINES[kind](spec, ctx)
