"""The scripts a worker writes a job's runs, log lines and artifact records through, in a real
Redis: only the job's latest attempt may write (a replaced one, woken late, changes nothing),
and a caller that names no attempt (the API closing a force-cancelled run) may always."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from app import records
from modelpress import _stack
from tests.conftest import fresh_db


@pytest.fixture
def r(redis_server: _stack.EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port, db=fresh_db(), decode_responses=True)
    client.hset(records.job_key("job_1"), mapping={"state": "running", "attempts": "2"})
    yield client
    client.flushdb()


def test_only_the_latest_attempt_writes_a_hash(r: redis.Redis) -> None:
    runs = records.runs_key("job_1")
    assert not records.hset_if_job(r, "job_1", runs, "1", "stale", attempt=1)
    assert records.hset_if_job(r, "job_1", runs, "2", "current", attempt=2)
    assert records.hset_if_job(r, "job_1", runs, "1", "lost", attempt=2)  # the latest marks it
    assert r.eval(records.HSET_IF_JOB, 2, records.job_key("job_1"), runs, "2", "api")  # no attempt
    assert r.hgetall(runs) == {"1": "lost", "2": "api"}
    assert not records.hset_if_job(r, "job_9", runs, "1", "x")  # no such job


def test_only_the_latest_attempt_writes_log_lines(r: redis.Redis) -> None:
    def log(line: str, *attempt: str) -> int:
        return int(r.eval(records.LOG_IF_JOB, 3, records.job_key("job_1"),
                          records.log_key("job_1"), records.events_key("job_1"), line, 100,
                          "{}", 1000, *attempt))

    assert (log("stale", "1"), log("current", "2"), log("any")) == (0, 1, 1)
    assert r.lrange(records.log_key("job_1"), 0, -1) == ["current", "any"]
