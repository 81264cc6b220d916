"""A job whose create wrote its record but died before handing it to the queue is sent by the
API's unsent-jobs loop; cancelled or deleted ones are dropped. Against a real Redis and a real
Celery producer (its broker is that Redis): the queue is read back from the broker's list."""

from __future__ import annotations

import json
import uuid

import redis

from app import jobs, records, unsent
from app.config import Settings
from app.deps import Services
from app.schemas import Job, Progress
from tests.app.conftest import TENANT, body, run


def queued_ids(settings: Settings, queue: str = "cpu") -> list[str]:
    """The task ids in the broker's list for ``queue`` (kombu's Redis transport)."""
    r = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    return [json.loads(m)["headers"]["id"] for m in r.lrange(queue, 0, -1)]


def unsent_ids(settings: Settings) -> list[str]:
    r = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    return list(r.zrange(records.UNSENT_KEY, 0, -1))


async def written_not_sent(svc: Services, seq: int) -> str:
    """What a create leaves when its process dies after writing the job, before sending it."""
    spec = body().spec
    job = Job(id=f"job_{uuid.uuid4().hex}", kind=spec.kind, name="bench", state="queued",
              spec=spec, queue="cpu", created_at=records.now(),
              progress=Progress(stage="queued", updated_at=records.now()))
    await jobs._write_job(svc, TENANT, job, seq, None)
    return job.id


def test_a_job_whose_create_died_before_the_queue_is_sent(settings: Settings) -> None:
    job_id: str = run(settings, lambda svc: written_not_sent(svc, 1))
    assert unsent_ids(settings) == [job_id] and queued_ids(settings) == []
    assert run(settings, lambda svc: unsent.resend(svc, stale_s=3600)) == 0  # not stale yet
    assert queued_ids(settings) == []
    assert run(settings, lambda svc: unsent.resend(svc, stale_s=0)) == 1
    assert queued_ids(settings) == [job_id] and unsent_ids(settings) == []
    assert run(settings, lambda svc: unsent.resend(svc, stale_s=0)) == 0  # sent once


def test_cancelled_or_deleted_unsent_jobs_are_dropped(settings: Settings) -> None:
    async def both(svc: Services) -> tuple[str, str]:
        cancelled, deleted = await written_not_sent(svc, 1), await written_not_sent(svc, 2)
        await jobs.cancel_job(svc, TENANT, cancelled, force=False)
        await jobs.cancel_job(svc, TENANT, deleted, force=False)
        await jobs.delete_job(svc, TENANT, deleted)
        return cancelled, deleted

    run(settings, both)
    assert len(unsent_ids(settings)) == 2
    assert run(settings, lambda svc: unsent.resend(svc, stale_s=0)) == 0
    assert queued_ids(settings) == [] and unsent_ids(settings) == []


def test_a_create_that_reaches_the_queue_leaves_nothing_unsent(settings: Settings) -> None:
    job, created = run(settings, lambda svc: jobs.create_job(svc, TENANT, body()))
    assert created and queued_ids(settings) == [job.id] and unsent_ids(settings) == []
