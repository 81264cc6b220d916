"""A figure that came out NaN or infinite is stored and served as a JSON string and reads back
as the float; with pydantic's default (null) a required float refused it, and the job could
not be read at all."""

from __future__ import annotations

import inspect
import json
import math

from pydantic import BaseModel

from app import schemas
from app.schemas import LatencyStats, LossRow


def test_nan_and_inf_figures_survive_the_job_store() -> None:
    stats = LatencyStats(median_ms=math.nan, p90_ms=math.inf, mean_ms=-math.inf, min_ms=1.0,
                         repeats=3, warmup=1)
    text = stats.model_dump_json()
    assert json.loads(text)["median_ms"] == "NaN"  # valid JSON for every client
    back = LatencyStats.model_validate_json(text)
    assert math.isnan(back.median_ms) and back.p90_ms == math.inf and back.mean_ms == -math.inf
    row = LossRow(impl="torch", n=1, d=1, v=1, dtype="float16", device="cpu", time_ms=1.0,
                  peak_extra_bytes=0, loss=math.inf)
    assert LossRow.model_validate_json(row.model_dump_json()).loss == math.inf  # not None


def test_every_schema_writes_nan_as_a_string() -> None:
    for name, cls in inspect.getmembers(schemas, inspect.isclass):
        if issubclass(cls, BaseModel) and cls.__module__ == schemas.__name__:
            assert cls.model_config.get("ser_json_inf_nan") == "strings", name
