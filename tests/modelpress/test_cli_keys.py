"""`modelpress keys create` finds a local serve's embedded Redis through the file serve writes
(its port is new each start), and says what to set when there is none."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner

from app import auth
from modelpress import _stack
from modelpress.cli import main
from tests.conftest import fresh_db


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.delenv("MODELPRESS_REDIS_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env from elsewhere
    return {"MODELPRESS_DATA_DIR": str(tmp_path / ".modelpress")}


def test_keys_create_uses_a_local_serves_redis(env: dict[str, str], tmp_path: Path,
                                               redis_server: _stack.EmbeddedRedis) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/{fresh_db()}"
    (tmp_path / ".modelpress").mkdir()
    (tmp_path / ".modelpress" / "redis-url").write_text(url + "\n")  # as serve writes it
    result = CliRunner().invoke(main, ["keys", "create", "--tenant", "acme"], env=env)
    assert result.exit_code == 0, result.output
    token = result.output.strip()

    async def tenant_of() -> str | None:
        r = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            who = await auth.authenticate(r, token)
        finally:
            await r.aclose()
        return who.tenant if who else None

    assert asyncio.run(tenant_of()) == "acme"


def test_keys_create_without_a_redis_says_what_to_set(env: dict[str, str], tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["keys", "create", "--tenant", "acme"], env=env)
    assert result.exit_code == 2 and "set MODELPRESS_REDIS_URL" in result.output
    assert "no local `modelpress serve` is running here" in result.output
    # a serve that was killed left its file: the dead address is named
    (tmp_path / ".modelpress").mkdir()
    dead = f"redis://127.0.0.1:{_stack.free_port()}/0"
    (tmp_path / ".modelpress" / "redis-url").write_text(dead)
    result = CliRunner().invoke(main, ["keys", "create", "--tenant", "acme"], env=env)
    assert result.exit_code == 2 and f"could not reach Redis at {dead}" in result.output
    assert "no longer runs: start it again or set MODELPRESS_REDIS_URL" in " ".join(result.output.split())
