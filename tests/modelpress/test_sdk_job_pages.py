"""The SDK's jobs.list() and jobs.iter() and `modelpress jobs list` with a filter, against the
real API app (served by uvicorn in a thread) and a real Redis: iter() follows a page the server
cut short at its scan bound (short, with a cursor) to the matches past it, and ends when the
server gives no cursor; the CLI says when its one page was cut short."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import uvicorn
from click.testing import CliRunner

from app import auth
from app.config import Settings
from app.main import create_app
from app.schemas import JOB_LIST_SCAN_LIMIT
from modelpress import AsyncClient, Client, _stack
from modelpress.cli import main
from tests.app.conftest import put_jobs, services
from tests.conftest import fresh_db


@pytest.fixture
def base_url(settings: Settings) -> Iterator[str]:
    """The API on a free port, served from a thread of this process."""
    port = _stack.free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(20)
    assert not thread.is_alive(), "the API did not stop"


@pytest.fixture
def settings(tmp_path: Path, redis_server: _stack.EmbeddedRedis) -> Iterator[Settings]:
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/{fresh_db()}",
                        store_url=(tmp_path / "store").as_uri(), rate_limit_per_minute=0)
    r = redis.Redis.from_url(settings.redis_url or "")
    r.flushdb()
    yield settings
    r.flushdb()


def test_iter_follows_a_page_cut_short_by_the_scan_bound(settings: Settings, base_url: str
                                                         ) -> None:
    tenant = f"t{uuid.uuid4().hex[:12]}"
    with redis.Redis.from_url(settings.redis_url or "") as r:
        token = auth.create_key(r, tenant, "test")

    async def seed() -> tuple[list[str], list[str]]:
        svc = services(settings)
        try:
            old = await put_jobs(svc, tenant, ["cancelled"] * 3)
            await put_jobs(svc, tenant, ["queued"] * (JOB_LIST_SCAN_LIMIT + 10))
            new = await put_jobs(svc, tenant, ["cancelled", "queued"])
            return old, new
        finally:
            await svc.redis.aclose()

    old, new = asyncio.run(seed())
    with Client(base_url, token) as c:
        first = c.jobs.list(limit=2, state="cancelled")
        assert ([j.id for j in first.items], first.partial) == ([new[0]], True)
        assert first.next_cursor is not None
        rest = c.jobs.list(limit=2, state="cancelled", cursor=first.next_cursor)
        assert [j.id for j in rest.items] == old[:0:-1] and rest.next_cursor is not None
        last = c.jobs.list(limit=2, state="cancelled", cursor=rest.next_cursor)
        assert ([j.id for j in last.items], last.next_cursor) == ([old[0]], None)
        assert [j.id for j in c.jobs.iter(state="cancelled")] == [new[0], *old[::-1]]

    async def via_async() -> list[str]:
        async with AsyncClient(base_url, token) as ac:
            return [j.id async for j in ac.jobs.iter(state="cancelled")]

    assert asyncio.run(via_async()) == [new[0], *old[::-1]]
    # the CLI shows the one page it got, and says that older jobs may match
    args = ["--base-url", base_url, "--api-key", token, "jobs", "list", "--state", "cancelled"]
    out = CliRunner().invoke(main, [*args, "--limit", "2"])
    assert [line.split()[0] for line in out.stdout.splitlines()] == [new[0]], out.output
    assert "older ones may match: add --all" in out.stderr
    out = CliRunner().invoke(main, [*args, "--all"])
    assert [line.split()[0] for line in out.stdout.splitlines()] == [new[0], *old[::-1]]
    assert out.stderr == ""
