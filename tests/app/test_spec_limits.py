"""Values a spec's fields take one by one but the engine cannot run: refused when the job is
created, with a message that says what to change (each one crashed a job before)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.schemas import (
    BenchmarkSpec,
    IntrinsicDimensionSpec,
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
