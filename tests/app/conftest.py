"""Fixtures and helpers of the API tests that call its modules directly against the session's
real Redis (and a real Celery producer whose broker is that Redis: no worker is needed to queue
a job)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app import assets, records
from app.config import Settings
from app.deps import Services
from app.redis_client import async_client
from app.schemas import (
    BenchmarkSpec,
    DatasetInfo,
    DatasetRef,
    Job,
    JobCreate,
    JobState,
    ModelRef,
    Progress,
)
from app.storage import open_store
from modelpress import _stack
from tests.conftest import fresh_db
from workers.celery_app import create_celery

TENANT = "t1"


@pytest.fixture
def settings(tmp_path: Path, redis_server: _stack.EmbeddedRedis) -> Iterator[Settings]:
    """Settings naming a Redis database of its own (empty before and after) and a local store."""
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/{fresh_db()}",
                        store_url=(tmp_path / "store").as_uri())
    r = redis.Redis.from_url(settings.redis_url or "")
    r.flushdb()
    yield settings
    r.flushdb()


def services(settings: Settings) -> Services:
    return Services(settings, async_client(settings), open_store(settings),
                    create_celery(settings))


def run(settings: Settings, body: Callable[[Services], Awaitable[Any]]) -> Any:
    """``body`` on fresh services in an event loop of its own; its result."""
    async def main() -> Any:
        svc = services(settings)
        try:
            return await body(svc)
        finally:
            await svc.redis.aclose()

    return asyncio.run(main())


async def upload(svc: Services) -> str:
    """A dataset record and its file, as POST /v1/datasets leaves them."""
    info = DatasetInfo(id=f"dst_{uuid.uuid4().hex}", name="d", format="npz", size=3,
                       sha256="0" * 64, created_at=records.now(), tensors={})
    svc.store.put_bytes(records.dataset_object(TENANT, info.id, "npz"), b"abc")
    await assets._recorded(svc, "datasets", TENANT, info)
    return info.id


def body(dataset: str | None = None) -> JobCreate:
    """A benchmark job's create request, naming ``dataset`` if given."""
    spec = BenchmarkSpec(model=ModelRef(zoo="digits-cnn"),
                         dataset=DatasetRef(id=dataset) if dataset else None)
    return JobCreate(spec=spec, name="bench")


async def put_jobs(svc: Services, tenant: str, states: list[JobState]) -> list[str]:
    """Benchmark jobs of ``tenant`` in ``states`` (oldest first), recorded and indexed as
    ``jobs._write_job`` leaves them; their ids, oldest first."""
    spec = BenchmarkSpec(model=ModelRef(zoo="digits-cnn"))
    first = int(await svc.redis.incrby(records.tenant_seq_key(tenant), len(states))) - len(states)
    pipe = svc.redis.pipeline(transaction=False)
    ids: list[str] = []
    for seq, state in enumerate(states, start=first + 1):
        job = Job(id=f"job_{uuid.uuid4().hex}", kind="benchmark", name=state, state=state,
                  spec=spec, queue="cpu", created_at=records.now(),
                  progress=Progress(stage=state, updated_at=records.now()))
        pipe.hset(records.job_key(job.id), mapping=records.job_to_hash(job, tenant, seq))
        pipe.zadd(records.tenant_jobs_key(tenant), {job.id: seq})
        ids.append(job.id)
    await pipe.execute()
    return ids
