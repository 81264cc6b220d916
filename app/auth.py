"""API keys: random bearer tokens, stored only as SHA-256 hashes, each bound to one tenant.

The tokens carry 256 bits of randomness, so a fast hash is enough (no password stretching);
lookups are by hash and the final comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis

from app import records

TOKEN_PREFIX = "mp_"
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class Principal:
    tenant: str
    key_name: str
    token_hash: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def create_key(r: redis.Redis, tenant: str, name: str, token: str | None = None) -> str:
    """Store a new key for ``tenant`` and return the plain token (shown once)."""
    if not TENANT_RE.fullmatch(tenant):  # match() lets "$" accept a trailing newline
        raise ValueError("tenant must be 1-63 chars of a-z, 0-9, '_' or '-', starting alphanumeric")
    token = token or new_token()
    digest = hash_token(token)
    r.hset(
        records.apikey_key(digest),
        mapping={"tenant": tenant, "name": name, "hash": digest, "created_at": records.iso()},
    )
    return token


async def authenticate(r: aioredis.Redis, token: str) -> Principal | None:
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    digest = hash_token(token)
    entry: dict[str, str] = await r.hgetall(records.apikey_key(digest))
    if not entry or not hmac.compare_digest(entry.get("hash", ""), digest):
        return None
    return Principal(tenant=entry["tenant"], key_name=entry.get("name", ""), token_hash=digest)
