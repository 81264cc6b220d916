"""A create whose queue does not answer, at the module level: the API's Redis is real and up;
the Celery producer's broker is a real port that nothing listens on. The job is kept, failed
with the reason and a final event; its Idempotency-Key is freed for a new try."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from app import jobs, records
from app.config import Settings
from app.deps import Services
from app.errors import ApiError
from app.redis_client import async_client
from app.storage import open_store
from modelpress import _stack
from tests.app.conftest import TENANT, body
from workers.celery_app import create_celery


def test_a_create_the_queue_refuses_fails_the_job_with_its_reason(settings: Settings) -> None:
    import asyncio

    dead = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{_stack.free_port()}/0"})
    celery = create_celery(dead)
    celery.conf.broker_transport_options = {**celery.conf.broker_transport_options,
                                            "max_retries": 1, "interval_start": 0,
                                            "interval_step": 0.2, "interval_max": 0.2}
    celery.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0,
                                             "interval_step": 0.2, "interval_max": 0.2}

    async def create() -> Any:
        svc = Services(settings, async_client(settings), open_store(settings), celery)
        try:
            with pytest.raises(ApiError) as err:
                await jobs.create_job(svc, TENANT, body(), idempotency_key="enqueue-0001")
            return err.value
        finally:
            await svc.redis.aclose()

    err = asyncio.run(create())
    assert (err.status, err.message) == (503, "the job queue is unavailable; try again shortly")
    r = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    [job_id] = r.zrange(records.tenant_jobs_key(TENANT), 0, -1)
    h = r.hgetall(records.job_key(job_id))
    assert h["state"] == "failed" and json.loads(h["error"])["type"] == "enqueue_failed"
    assert json.loads(h["progress"])["stage"] == "failed"
    events = [json.loads(f["data"]) for _, f in r.xrange(records.events_key(job_id))]
    assert [e.get("state") for e in events] == ["queued", "failed"]
    assert "could not reach the queue" in events[-1]["message"]
    assert r.zscore(records.FINISHED_KEY, job_id) is not None
    assert r.zcard(records.UNSENT_KEY) == 0  # not sent later behind the user's back
    assert r.get(records.idempotency_key(TENANT, "enqueue-0001")) is None  # a retry makes a job
