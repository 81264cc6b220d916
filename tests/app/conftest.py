"""Fixtures of the API tests that call its modules directly against the session's real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.config import Settings
from modelpress import _stack
from tests.conftest import fresh_db


@pytest.fixture
def settings(tmp_path: Path, redis_server: _stack.EmbeddedRedis) -> Iterator[Settings]:
    """Settings naming a Redis database of its own (empty before and after) and a local store."""
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/{fresh_db()}",
                        store_url=(tmp_path / "store").as_uri())
    r = redis.Redis.from_url(settings.redis_url or "")
    r.flushdb()
    yield settings
    r.flushdb()
