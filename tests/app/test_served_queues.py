"""Which queues the live workers consume, from their heartbeat keys in a real Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app import records
from app.config import Settings
from app.deps import Services
from app.jobs import served_queues
from app.redis_client import async_client
from app.storage import open_store
from modelpress import _stack
from tests.conftest import fresh_db


@pytest.fixture
def settings(tmp_path: Path, redis_server: _stack.EmbeddedRedis) -> Iterator[Settings]:
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/{fresh_db()}",
                        store_url=(tmp_path / "store").as_uri())
    yield settings
    redis.Redis.from_url(settings.redis_url or "").flushdb()


def served(settings: Settings) -> tuple[int, set[str] | None]:
    async def main() -> tuple[int, set[str] | None]:
        svc = Services(settings, async_client(settings), open_store(settings),
                       celery=None)  # type: ignore[arg-type]  # nothing is enqueued
        try:
            return await served_queues(svc)
        finally:
            await svc.redis.aclose()

    return asyncio.run(main())


def test_the_union_of_the_workers_queues_or_unknown(settings: Settings) -> None:
    r = redis.Redis.from_url(settings.redis_url or "")
    assert served(settings) == (0, set())
    r.set(records.worker_key("a@h"), json.dumps({"hostname": "a@h", "queues": ["cpu"]}))
    r.set(records.worker_key("b@h"), json.dumps({"hostname": "b@h", "queues": ["cpu", "gpu"]}))
    assert served(settings) == (2, {"cpu", "gpu"})
    # a worker from before heartbeats named their queues: what it serves is unknown
    r.set(records.worker_key("c@h"), json.dumps({"hostname": "c@h"}))
    assert served(settings) == (3, None)
