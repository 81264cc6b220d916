"""Which queues the live workers consume, from their heartbeat keys in a real Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app import records
from app.config import Settings
from app.jobs import served_queues
from modelpress import _stack
from tests.app.test_idempotent_delete import run
from tests.conftest import fresh_db


@pytest.fixture
def settings(tmp_path: Path, redis_server: _stack.EmbeddedRedis) -> Iterator[Settings]:
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/{fresh_db()}",
                        store_url=(tmp_path / "store").as_uri())
    yield settings
    redis.Redis.from_url(settings.redis_url or "").flushdb()


def served(settings: Settings) -> tuple[int, set[str] | None]:
    out: tuple[int, set[str] | None] = run(settings, served_queues)
    return out


def test_the_union_of_the_workers_queues_or_unknown(settings: Settings) -> None:
    r = redis.Redis.from_url(settings.redis_url or "")
    assert served(settings) == (0, set())
    r.set(records.worker_key("a@h"), json.dumps({"hostname": "a@h", "queues": ["cpu"]}))
    r.set(records.worker_key("b@h"), json.dumps({"hostname": "b@h", "queues": ["cpu", "gpu"]}))
    assert served(settings) == (2, {"cpu", "gpu"})
    # a worker from before heartbeats named their queues: what it serves is unknown
    r.set(records.worker_key("c@h"), json.dumps({"hostname": "c@h"}))
    assert served(settings) == (3, None)
