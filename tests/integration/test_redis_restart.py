"""Redis restarted under a busy worker, with append-only persistence on (as docker-compose runs
it): the queue and the job records come back from the AOF, the worker and the API reconnect by
themselves, and every job runs once to success. Nothing is lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.schemas import BenchmarkSpec, ModelRef
from modelpress import _stack
from tests.conftest import DATABASES, Stack, make_stack, running
from tests.helpers import measured
from tests.integration.test_service import wait_for

pytestmark = pytest.mark.slow

OUTAGE_S = 5  # well inside MODELPRESS_REDIS_RETRY_S (30 s)
QUICK = BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), repeats=3, warmup=1, per_layer=False)


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[_stack.EmbeddedRedis]:
    # as many databases as the session's server: make_stack takes the next of its numbers
    server = _stack.EmbeddedRedis(tmp_path / "redis", appendonly=True,
                                  databases=DATABASES).start()
    yield server
    server.stop()


@pytest.fixture
def aof_stack(tmp_path: Path, aof_redis: _stack.EmbeddedRedis,
              shared_store: Path) -> Iterator[Stack]:
    yield from running(make_stack(tmp_path / "stack", aof_redis,
                                  {"MODELPRESS_STORE_URL": shared_store.as_uri()}))


def test_redis_restart_with_a_busy_worker_and_queued_jobs_loses_nothing(
        aof_stack: Stack, aof_redis: _stack.EmbeddedRedis) -> None:
    s = aof_stack
    key = s.key()
    with s.client(key) as client:
        busy = client.jobs.create(BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), repeats=3,
                                                min_time_s=4, per_layer=False))
        wait_for(lambda: client.jobs.get(busy.id).progress.stage == "measure", 60,
                 "the first job to be measuring")
        queued = [client.jobs.create(QUICK) for _ in range(3)]  # behind it on the one worker
        assert [client.jobs.get(j.id).state for j in queued] == ["queued"] * 3

        # SIGTERM: redis-server fsyncs the AOF and exits; a new one on the same port and
        # folder loads it. Down for a few seconds, as a restarted container would be.
        aof_redis.stop()
        down = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            during = pool.submit(httpx.get, f"{s.base_url}/v1/jobs/{busy.id}", timeout=60,
                                 headers={"Authorization": f"Bearer {key}"})
            time.sleep(OUTAGE_S)
            aof_redis.start()
            outage = time.monotonic() - down
            # asked while Redis was down (no SDK retries here): the API waited for Redis
            # instead of failing the request
            assert during.result(timeout=60).status_code == 200

        jobs = [client.jobs.wait(j.id, timeout=120) for j in (busy, *queued)]
    assert [j.state for j in jobs] == ["succeeded"] * 4, [j.error for j in jobs]  # none lost
    assert [j.attempts for j in jobs] == [1] * 4  # each ran once
    assert [[r.outcome for r in j.runs] for j in jobs] == [["succeeded"]] * 4
    # the worker came back on its own, and so did the API (the client above went through it)
    assert s.api is not None and all(p.poll() is None for p in (s.api, *s.workers))
    measured.append(f"redis restart: outage {outage:.1f} s with 1 running + 3 queued jobs; "
                    f"{sum(j.state == 'succeeded' for j in jobs)}/4 succeeded, "
                    f"attempts {[j.attempts for j in jobs]}, 0 lost")
