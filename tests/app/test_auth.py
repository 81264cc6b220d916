"""API-key checks against a real Redis: the exact key passes, a key one character off does not,
the final comparison is hmac.compare_digest (constant time) and it decides."""

from __future__ import annotations

import asyncio
import hmac
import uuid
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from app import auth, records
from modelpress import _stack


def _authenticate(server: _stack.EmbeddedRedis, token: str) -> auth.Principal | None:
    async def go() -> auth.Principal | None:
        r = aioredis.from_url(server.url, decode_responses=True)
        try:
            return await auth.authenticate(r, token)
        finally:
            await r.aclose()

    return asyncio.run(go())


@pytest.fixture
def issued(redis_server: _stack.EmbeddedRedis) -> tuple[str, str]:
    tenant = f"t{uuid.uuid4().hex[:12]}"
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    return tenant, auth.create_key(r, tenant, "test")


def test_only_the_exact_key_passes(redis_server: _stack.EmbeddedRedis,
                                   issued: tuple[str, str]) -> None:
    tenant, token = issued
    who = _authenticate(redis_server, token)
    assert who is not None and who.tenant == tenant
    last = "A" if token[-1] != "A" else "B"
    for near in (token[:-1] + last, token[:-1], token + "A", token.upper(), "x" + token[1:]):
        assert _authenticate(redis_server, near) is None, near


def test_the_final_comparison_is_compare_digest_and_it_decides(
        redis_server: _stack.EmbeddedRedis, issued: tuple[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, token = issued
    digest = auth.hash_token(token)
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:  # the real function, watched
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert _authenticate(redis_server, token) is not None
    assert calls == [(digest, digest)]

    # A record found by the lookup but whose stored digest differs is refused: the constant-time
    # comparison, not the lookup alone, accepts a key.
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    r.hset(records.apikey_key(digest), "hash", "0" * 64)
    calls.clear()
    assert _authenticate(redis_server, token) is None
    assert calls == [("0" * 64, digest)]


def test_a_tenant_name_with_a_trailing_newline_is_refused(
        redis_server: _stack.EmbeddedRedis) -> None:
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    with pytest.raises(ValueError, match="tenant must be"):
        auth.create_key(r, "acme\n", "test")
