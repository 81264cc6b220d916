"""Retention: with MODELPRESS_JOB_RETENTION_DAYS set, the API deletes finished jobs once they
are older than that (here 3 s), files included, and never a queued or running one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import records
from app.schemas import BenchmarkSpec, ModelRef
from modelpress import NotFoundError, _stack
from tests.conftest import Stack, make_stack, running
from tests.integration.test_service import wait_for

pytestmark = pytest.mark.slow

RETENTION_S = 3.0


@pytest.fixture(scope="module")
def retention_stack(tmp_path_factory: pytest.TempPathFactory, redis_server: _stack.EmbeddedRedis,
                    shared_store: Path) -> Iterator[Stack]:
    yield from running(make_stack(tmp_path_factory.mktemp("retention"), redis_server, {
        "MODELPRESS_STORE_URL": shared_store.as_uri(),
        "MODELPRESS_JOB_RETENTION_DAYS": str(RETENTION_S / 86_400)}))


def _gone(client: object, job_id: str) -> bool:
    try:
        client.jobs.get(job_id)  # type: ignore[attr-defined]
    except NotFoundError:
        return True
    return False


def test_finished_jobs_expire_live_ones_stay(retention_stack: Stack, shared_store: Path) -> None:
    s = retention_stack
    with s.client() as client:
        quick = client.jobs.wait(client.jobs.create(BenchmarkSpec(
            model=ModelRef(zoo="digits-cnn"), repeats=3, per_layer=False)).id, timeout=60)
        finished_at = time.monotonic()
        assert [p for p in shared_store.rglob("*") if quick.id in p.parts]
        live = client.jobs.create(BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), repeats=10,
                                                min_time_s=120, per_layer=False))
        queued = client.jobs.create(BenchmarkSpec(model=ModelRef(zoo="digits-cnn")))
        wait_for(lambda: _gone(client, quick.id), 30, "the finished job to expire")
        assert time.monotonic() - finished_at > RETENTION_S - 1  # not before its time
        assert not [p for p in shared_store.rglob("*") if quick.id in p.parts]
        assert s.redis.keys(f"mp:job:{quick.id}*") == []
        # Jobs older than the retention period (created before the expired one was deleted)
        # but queued or running are not touched by the sweeps (one a second).
        time.sleep(2.5)
        assert client.jobs.get(live.id).state == "running"
        assert client.jobs.get(queued.id).state == "queued"
        # Cancelled (the queued one at once by the API, the running one by its worker), both
        # enter the index and expire in turn.
        client.jobs.cancel(queued.id)
        client.jobs.cancel(live.id)
        wait_for(lambda: _gone(client, queued.id) and _gone(client, live.id), 40,
                 "the cancelled jobs to expire")
    assert s.redis.zcard(records.FINISHED_KEY) == 0
    assert "retention: deleted" in s.log("api").read_text()
