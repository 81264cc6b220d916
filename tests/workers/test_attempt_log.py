"""The attempt's log artifact is capped: a job that logs without end kept every line in the
worker's memory (and in the artifact), though Redis keeps only the last few thousand."""

from __future__ import annotations

import logging
from pathlib import Path

from app.config import Settings
from app.redis_client import sync_client
from app.storage import open_store
from modelpress import _stack
from tests.conftest import fresh_db
from workers.runner import WorkerContext, _RedisLogHandler


def test_the_attempt_log_keeps_its_head_and_tail(tmp_path: Path,
                                                 redis_server: _stack.EmbeddedRedis) -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/{fresh_db()}",
                        log_lines_kept=10, store_url=(tmp_path / "store").as_uri())
    r = sync_client(settings)
    ctx = WorkerContext("job_log_cap", "t", 1, settings, r, open_store(settings), tmp_path)
    handler = _RedisLogHandler(ctx, keep=100)
    log = logging.getLogger("test.attempt_log")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        for i in range(1000):
            log.info("line %d", i)
    finally:
        log.removeHandler(handler)
        r.flushdb()
    lines = handler.lines
    assert len(lines) == 101, len(lines)
    assert lines[0].endswith("line 0") and lines[49].endswith("line 49")
    assert lines[50] == "... 900 lines left out (the first 50 and the last 50 are kept) ..."
    assert lines[51].endswith("line 950") and lines[-1].endswith("line 999")
