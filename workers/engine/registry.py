"""Job kind -> engine function."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
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


@contextmanager
def _own_threads() -> Iterator[None]:
    """A job or piece may set torch's thread count (a spec's ``threads``, a piece following its
    job's); the worker process's next job starts from the process's own count again."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n)


def usable_cores() -> int:
    """The cores this process may run on (affinity, cpusets) where the OS says; else all."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run(spec: AnySpec, ctx: JobContext) -> BaseModel:
    threads, cores = getattr(spec, "threads", None), usable_cores()
    if threads and threads > cores:
        # applied as given (the spec may be meant for another worker), but the timings it
        # yields measure threads waiting for cores: say so where the user reads the job.
        # The cores this process may run on (affinity, cpusets), not the host's count.
        ctx.log.warning("threads %d is more than this worker's %d cores: latencies will include "
                        "the threads' contention for them; give at most %d", threads, cores, cores)
    with _own_threads():
        return ENGINES[spec.kind](spec, ctx)


def run_item(spec: AnySpec, ctx: JobContext, item: dict[str, Any]) -> None:
    with _own_threads():
        ITEMS[spec.kind](spec, ctx, item)
