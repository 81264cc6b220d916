"""POST /v1/jobs with an Idempotency-Key, at the module level against a real Redis and a real
Celery producer (its broker is that Redis; no worker is needed to queue a job): a key left
naming a job that was never written, a retry that overlaps a slow first try, and retries that a
check would refuse now (an input of the job deleted, a check added since)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis

from app import assets, jobs, records
from app.config import Settings
from app.deps import Services
from app.errors import ApiError
from app.schemas import Job, JobCreate, MixedPrecisionSpec, ModelRef, Progress
from tests.app.conftest import TENANT, body, run, services, upload

KEY = "create-key-0001"


def tenant_jobs(settings: Settings) -> list[str]:
    r = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    return list(r.zrange(records.tenant_jobs_key(TENANT), 0, -1))


def test_a_key_naming_a_job_never_written_is_taken_by_the_retry(settings: Settings) -> None:
    """The first try set the key, then failed to write its job and could not free the key (Redis
    went away in between, or the API process died): the retry makes the job instead of being
    told for 24 h that the first try is 'still being processed'."""
    async def body_(svc: Services) -> tuple[Any, bool, str | None]:
        idem = records.idempotency_key(TENANT, KEY)
        await svc.redis.set(idem, f"job_{uuid.uuid4().hex}", ex=records.IDEMPOTENCY_TTL_S)
        job, created = await jobs.create_job(svc, TENANT, body(), KEY)
        again, created_again = await jobs.create_job(svc, TENANT, body(), KEY)
        assert (again.id, created_again) == (job.id, False)
        return job, created, await svc.redis.get(idem)

    job, created, named = run(settings, body_)
    assert created and named == job.id
    assert tenant_jobs(settings) == [job.id]


def test_a_retry_overlapping_a_stalled_first_try_makes_one_job(settings: Settings) -> None:
    """Try A sets the key and stalls before writing its job (here: reading the dataset it
    names); the retry B takes the key over and makes the job; A, resumed, writes nothing."""
    async def body_(svc: Services) -> None:
        dataset = await upload(svc)
        slow = services(settings)  # try A's own connections, whose reads of the dataset stall
        a_waiting, release = asyncio.Event(), asyncio.Event()
        inner_get = slow.redis.get

        async def get(name: str) -> Any:
            if name == records.asset_key("datasets", dataset):
                a_waiting.set()
                await release.wait()
            return await inner_get(name)

        slow.redis.get = get  # type: ignore[method-assign]
        try:
            a = asyncio.create_task(jobs.create_job(slow, TENANT, body(dataset), KEY))
            await asyncio.wait_for(a_waiting.wait(), 10)
            b, created = await asyncio.wait_for(jobs.create_job(svc, TENANT, body(dataset), KEY),
                                                10)
            assert created
            release.set()
            with pytest.raises(ApiError) as exc:
                await asyncio.wait_for(a, 10)
            assert exc.value.status == 409 and "took it over" in exc.value.message
            assert await svc.redis.get(records.idempotency_key(TENANT, KEY)) == b.id
            assert tenant_jobs(settings) == [b.id]
            again, created_again = await jobs.create_job(svc, TENANT, body(dataset), KEY)
            assert (again.id, created_again) == (b.id, False)
        finally:
            await slow.redis.aclose()

    run(settings, body_)


def test_a_retry_after_an_input_was_deleted_returns_the_job(settings: Settings) -> None:
    """The reply to the first try was lost; meanwhile the job ended and its dataset was deleted.
    The retry with the same key answers with that job, not a 404 for the dataset."""
    async def body_(svc: Services) -> None:
        dataset = await upload(svc)
        job, _ = await jobs.create_job(svc, TENANT, body(dataset), KEY)
        await jobs.cancel_job(svc, TENANT, job.id, force=False)  # queued: cancelled at once
        await assets.delete_asset(svc, "datasets", TENANT, dataset)
        again, created = await jobs.create_job(svc, TENANT, body(dataset), KEY)
        assert (again.id, again.state, created) == (job.id, "cancelled", False)
        # a new key still gets the 404 for the missing dataset, and leaves no key behind
        with pytest.raises(ApiError) as exc:
            await jobs.create_job(svc, TENANT, body(dataset), "create-key-0002")
        assert exc.value.status == 404
        assert await svc.redis.get(records.idempotency_key(TENANT, "create-key-0002")) is None

    run(settings, body_)


def test_a_retry_is_answered_before_a_check_added_since(settings: Settings) -> None:
    """The first try was accepted by a release without today's spec check (LoRA with the
    default static levels of a conv model; its job record and key are written here as that
    release left them). The retry with the same key answers with that job, not the check's
    422; the same spec under a new key is still refused, and leaves no key behind."""
    refused = JobCreate(spec=MixedPrecisionSpec(model=ModelRef(zoo="digits-cnn"), lora={}))

    async def body_(svc: Services) -> None:
        with pytest.raises(ApiError) as exc:  # today's first try is checked in full
            await jobs.create_job(svc, TENANT, refused, "create-key-0002")
        assert exc.value.status == 422 and "LoRA recovery" in exc.value.message
        assert await svc.redis.get(records.idempotency_key(TENANT, "create-key-0002")) is None
        # what the earlier release's create left: the key, then the record naming it
        job = Job(id=f"job_{uuid.uuid4().hex}", kind="mixed_precision", state="queued",
                  spec=refused.spec, queue="cpu", created_at=records.now(), progress=Progress())
        idem = records.idempotency_key(TENANT, KEY)
        await svc.redis.set(idem, job.id, ex=records.IDEMPOTENCY_TTL_S)
        await jobs._write_job(svc, TENANT, job, 1, idem)
        again, created = await jobs.create_job(svc, TENANT, refused, KEY)
        assert (again.id, again.spec, created) == (job.id, refused.spec, False)

    run(settings, body_)
