"""A Redis outage longer than the client's retries just as a job ends: the attempt waits for
Redis and records its outcome then. It gave up before (the task raised, Celery acknowledged its
message) and the job stayed 'running' for good, its result lost."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from app import records
from app.config import Settings
from app.redis_client import sync_client
from app.schemas import RunAttempt
from app.storage import open_store
from modelpress import _stack
from workers import runner

JOB = "job_outage_at_finish"


class Ending(NamedTuple):
    """An attempt that has reached its outcome, its Redis (still up) and its context."""

    server: _stack.EmbeddedRedis
    ctx: runner.WorkerContext
    run: RunAttempt


@pytest.fixture
def ending(tmp_path: Path) -> Iterator[Ending]:
    server = _stack.EmbeddedRedis(tmp_path / "redis", appendonly=True).start()
    settings = Settings(redis_url=server.url, redis_retry_s=0.5,
                        store_url=(tmp_path / "store").as_uri())
    r = sync_client(settings)
    try:
        r.hset(records.job_key(JOB), mapping={"state": "running", "attempts": "1",
                                              "tenant": "t"})
        yield Ending(server, runner.WorkerContext(JOB, "t", 1, settings, r,
                                                  open_store(settings), tmp_path),
                     RunAttempt(attempt=1, worker="w1@host", started_at=records.now()))
    finally:
        r.close()
        server.stop()


def test_an_outcome_is_recorded_once_redis_is_back(ending: Ending, tmp_path: Path) -> None:
    server, ctx, run = ending
    r = ctx.r
    server.stop()  # down for longer than the client retries (0.5 s)
    closing = threading.Thread(target=runner._close_attempt, daemon=True, args=(
        ctx, run, ["a line of the attempt's log"], "succeeded", '{"x": 1}', None))
    closing.start()
    time.sleep(3)
    assert closing.is_alive()  # waiting for Redis, not gone with the outcome
    server.start()
    closing.join(60)
    assert not closing.is_alive()
    job = r.hgetall(records.job_key(JOB))
    assert job["state"] == "succeeded" and job["result"] == '{"x": 1}'
    assert RunAttempt.model_validate_json(
        r.hget(records.runs_key(JOB), "1") or "").outcome == "succeeded"
    assert r.hexists(records.artifacts_key(JOB), "job-attempt1.log")
    log = (tmp_path / "store" / records.artifact_object("t", JOB, "job-attempt1.log"))
    assert log.read_text() == "a line of the attempt's log\n"


def test_the_soft_time_limit_does_not_end_the_wait(ending: Ending) -> None:
    """Celery's soft limit is an exception raised by a signal handler wherever the task is: here
    the wait for Redis, with the job's outcome reached and not yet recorded."""
    server, ctx, run = ending

    def soft_limit(*_: object) -> None:
        # Redis back first (started from the main thread: its PR_SET_PDEATHSIG follows the
        # thread that starts it), then the limit: without the fix it ends the wait regardless
        server.start()
        raise SoftTimeLimitExceeded()

    previous = signal.signal(signal.SIGALRM, soft_limit)
    try:
        server.stop()
        signal.setitimer(signal.ITIMER_REAL, 2)  # lands while the outcome waits for Redis
        runner._close_attempt(ctx, run, ["a line"], "succeeded", '{"x": 1}', None)
        assert ctx.r.hget(records.job_key(JOB), "state") == "succeeded"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
