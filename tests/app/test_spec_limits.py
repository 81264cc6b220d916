"""Values a spec's fields take one by one but the engine cannot run: refused when the job is
created, with a message that says what to change (each one crashed or hung a job before)."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from app import jobs
from app.config import Settings
from app.deps import Services
from app.errors import ApiError
from app.schemas import (
    BenchmarkSpec,
    IntrinsicDimensionSpec,
    JobCreate,
    ModelRef,
    SensitivityOptions,
    SpikingSpec,
)

ZOO = ModelRef(zoo="digits-cnn")


def test_seeds_stay_in_the_range_the_engine_offsets() -> None:
    # 2**64 - 1 overflowed torch's generator once the engine added its per-stream offset
    for bad in (2**64 - 1, 2**32, -1):
        with pytest.raises(ValidationError, match="seed"):
            SpikingSpec(seed=bad)
        with pytest.raises(ValidationError, match="seeds"):
            IntrinsicDimensionSpec(seeds=[0, bad])
    assert SpikingSpec(seed=2**32 - 1).seed == 2**32 - 1


def test_dependency_weight_is_finite() -> None:
    # inf * 0 made NaN scores, which the stored result could not be read back with
    for bad in (float("inf"), float("nan"), 1e400, 1e7):
        with pytest.raises(ValidationError, match="dependency_weight"):
            SensitivityOptions(dependency_weight=bad)
    assert SensitivityOptions(dependency_weight=1e6).dependency_weight == 1e6


def test_a_random_input_must_fit_a_worker() -> None:
    with pytest.raises(ValidationError, match=r"268,435,456 \(1 GiB of float32\)"):
        BenchmarkSpec(model=ZOO, input_shape=[65536, 65536, 65536])
    assert BenchmarkSpec(model=ZOO, input_shape=[4096, 65536]).input_shape == [4096, 65536]


def test_a_benchmark_longer_than_its_job_may_run_is_refused() -> None:
    settings = Settings(task_time_limit_s=600)  # soft limit 569 s
    svc = Services(settings, None, None, None)  # type: ignore[arg-type]  # refused before any I/O
    body = JobCreate(spec=BenchmarkSpec(model=ZOO, min_time_s=300))
    with pytest.raises(ApiError) as refused:
        asyncio.run(jobs.create_job(svc, "t1", body))
    assert refused.value.status == 422
    assert refused.value.message == ("spec.min_time_s (300 s) must be at most half of a job's "
                                     "time limit here (569 s, from MODELPRESS_TASK_TIME_LIMIT_S)")
    jobs._check_time_limit(svc, BenchmarkSpec(model=ZOO, min_time_s=284))
