"""A job stored before a check on specs was added (or tightened) still reads: its record, the
list it is in and the dashboard's jobs page. Reading it through the submit-time checks failed
with a ValidationError, so GET /v1/jobs answered 500 for every page holding it, for good.
Against a real Redis and Celery producer (no worker)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app import jobs, records
from app.config import Settings
from app.deps import Services
from app.schemas import Budget, Job, JobCreate, MixedPrecisionSpec, stored_spec
from tests.app.conftest import TENANT, run

# Specs each refused at submit today, which older versions accepted (and failed in a worker).
OLD_SPECS: list[dict[str, Any]] = [
    {"kind": "mixed_precision", "model": {"zoo": "digits-cnn"},
     "budget": {"metric": "mse", "mode": "relative", "value": 0.999}},
    {"kind": "sensitivity", "model": {"zoo": "digits-cnn"}, "precision": "fp32"},
    {"kind": "spiking", "seed": 2**64 - 1},
    {"kind": "few_step_distill", "steps": [2, 2]},
]


@pytest.mark.parametrize("old", OLD_SPECS, ids=[s["kind"] for s in OLD_SPECS])
def test_a_job_stored_before_a_spec_check_still_reads(settings: Settings,
                                                      old: dict[str, Any]) -> None:
    async def body_(svc: Services) -> None:
        ok = {k: v for k, v in old.items() if k in ("kind", "model")}
        job, _ = await jobs.create_job(svc, TENANT, JobCreate.model_validate({"spec": ok}))
        await svc.redis.hset(records.job_key(job.id), mapping={
            "spec": json.dumps(old), "state": "failed", "finished_at": records.iso()})
        got = await jobs.get_job(svc, TENANT, job.id)
        assert got.state == "failed"
        assert got.spec.model_dump(mode="json", include=set(old), exclude_none=True) == old
        page = await jobs.list_jobs(svc, TENANT, 20, None, None, None)
        assert [j.id for j in page.items] == [job.id]
        assert (await jobs.delete_job(svc, TENANT, job.id)).deleted

    run(settings, body_)


def test_a_stored_spec_keeps_the_parts_that_still_validate(settings: Settings) -> None:
    spec = stored_spec(OLD_SPECS[0])
    assert isinstance(spec, MixedPrecisionSpec) and isinstance(spec.budget, Budget)
    assert spec.model.label() == "zoo:digits-cnn" and spec.budget.metric == "mse"
    assert spec.levels is None and spec.backend == "onnxruntime-cpu"  # defaults filled in


@pytest.mark.parametrize("old", OLD_SPECS, ids=[s["kind"] for s in OLD_SPECS])
def test_clients_read_such_a_job_and_new_jobs_are_still_checked(old: dict[str, Any]) -> None:
    # the SDK reads the API's JSON with the same Job model
    wire = {"id": "job_" + "0" * 32, "kind": old["kind"], "state": "failed", "spec": old,
            "queue": "cpu", "created_at": records.iso(), "progress": {}}
    job = Job.model_validate_json(json.dumps(wire))
    assert job.spec.model_dump(mode="json", include=set(old), exclude_none=True) == old
    with pytest.raises(ValueError):
        JobCreate.model_validate({"spec": old})
    with pytest.raises(ValueError, match="spec"):  # not a spec of any kind: still an error
        Job.model_validate({**wire, "spec": {"kind": "nonesuch"}})
