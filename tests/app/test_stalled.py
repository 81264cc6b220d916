"""A running job whose worker is gone (no lease renewed) is sent to the queue again by the
API's loop, once per attempt; a job whose lease lives, or that has ended, is left alone. Against
a real Redis and a real Celery producer (its broker is that Redis): the queue is read back from
the broker's list, and a worker's start is the runner's own START script."""

from __future__ import annotations

import time

import redis

from app import jobs, records, stalled
from app.config import Settings
from app.deps import Services
from tests.app.conftest import TENANT, body, run
from tests.app.test_unsent import queued_ids


def _sync(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url or "", decode_responses=True)


def started(settings: Settings) -> str:
    """A job created, taken off the queue by a worker and started (attempt 1), as the runner
    leaves it; the worker then dies (no lease is written here)."""
    job, _ = run(settings, lambda svc: jobs.create_job(svc, TENANT, body()))
    r = _sync(settings)
    r.delete("cpu")  # the broker's list: the worker took the message
    start(r, job.id)
    return job.id


def start(r: redis.Redis, job_id: str) -> None:
    r.eval(records.START, 3, records.job_key(job_id), records.events_key(job_id),
           records.RUNNING_KEY, records.iso(), "{}", 100, time.time(), job_id)


def resend(settings: Settings, stale_s: float = 0) -> int:
    async def once(svc: Services) -> int:
        return await stalled.resend(svc, stale_s)
    return int(run(settings, once))


def test_a_job_without_a_worker_is_sent_again_once_per_attempt(settings: Settings) -> None:
    job_id = started(settings)
    r = _sync(settings)
    assert r.zscore(records.RUNNING_KEY, job_id) is not None
    assert resend(settings) == 0  # first seen without a lease: not yet
    assert resend(settings, stale_s=3600) == 0 and queued_ids(settings) == []  # not long enough
    assert resend(settings) == 1 and queued_ids(settings) == [job_id]
    assert resend(settings) == 0 and resend(settings) == 0  # once for attempt 1
    assert queued_ids(settings) == [job_id]
    # the job reads as before (the loop's fields are the record's own)
    assert run(settings, lambda svc: jobs.get_job(svc, TENANT, job_id)).state == "running"

    # the new delivery starts attempt 2, and its worker dies too: sent again
    r.delete("cpu")
    start(r, job_id)
    assert resend(settings) == 0 and resend(settings) == 1 and queued_ids(settings) == [job_id]


def test_a_live_lease_or_an_ended_job_is_left_alone(settings: Settings) -> None:
    held, ended = started(settings), started(settings)
    r = _sync(settings)
    r.set(records.lease_key(held), "w1@host:100:aaaa", ex=60)
    r.hset(records.job_key(ended), "state", "succeeded")
    for _ in range(3):
        assert resend(settings) == 0
    assert queued_ids(settings) == []
    assert r.zrange(records.RUNNING_KEY, 0, -1) == [held]  # the ended one is off the list

    # a lease missing once, then back (a Redis outage the worker rode out): no send
    r.delete(records.lease_key(held))
    assert resend(settings) == 0
    r.set(records.lease_key(held), "w1@host:100:aaaa", ex=60)
    assert resend(settings) == 0
    r.delete(records.lease_key(held))
    assert resend(settings) == 0  # its first sighting again, not the second
    assert queued_ids(settings) == []

    r.delete(records.job_key(held))  # deleted: dropped from the list
    assert resend(settings) == 0 and r.zcard(records.RUNNING_KEY) == 0
