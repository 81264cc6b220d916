"""Job kind -> engine function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from app.schemas import AnySpec
from workers.engine import benchmark, loss_benchmark, mixed_precision
from workers.engine.context import JobContext
from workers.engine.diffusion import job as diffusion_job
from workers.engine.intrinsic import job as intrinsic_job
from workers.engine.spiking import job as spiking_job

ENGINES: dict[str, Callable[[Any, JobContext], BaseModel]] = {
    "benchmark": benchmark.run,
    "sensitivity": mixed_precision.run_sensitivity,
    "mixed_precision": mixed_precision.run,
    "loss_benchmark": loss_benchmark.run,
    "intrinsic_dimension": intrinsic_job.run,
    "spiking": spiking_job.run,
    "few_step_distill": diffusion_job.run,
}


# Kinds whose jobs fan independent pieces out to other workers: the piece runner.
ITEMS: dict[str, Callable[[Any, JobContext, dict[str, Any]], None]] = {
    "intrinsic_dimension": intrinsic_job.run_item,
    "sensitivity": mixed_precision.run_item,
    "mixed_precision": mixed_precision.run_item,
}


def run(spec: AnySpec, ctx: JobContext) -> BaseModel:
    return ENGINES[spec.kind](spec, ctx)


def run_item(spec: AnySpec, ctx: JobContext, item: dict[str, Any]) -> None:
    ITEMS[spec.kind](spec, ctx, item)
