"""Request dependencies: settings, Redis, the object store, the Celery producer, the caller."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

import redis.asyncio as aioredis
from celery import Celery
from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app import auth, records
from app.config import Settings
from app.errors import ApiError
from app.storage import Store


@dataclass
class Services:
    settings: Settings
    redis: aioredis.Redis
    store: Store
    celery: Celery


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


ServicesDep = Annotated[Services, Depends(services)]

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer mp_...`")


async def principal(
    request: Request,
    svc: ServicesDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> auth.Principal:
    token = creds.credentials if creds else request.cookies.get("modelpress_key")
    if not token:
        raise ApiError(401, "an API key is required: send `Authorization: Bearer <key>`",
                       headers={"WWW-Authenticate": "Bearer"})
    who = await auth.authenticate(svc.redis, token)
    if who is None:
        raise ApiError(401, "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
    await check_rate_limit(svc, who)
    return who


async def check_rate_limit(svc: Services, who: auth.Principal) -> None:
    """Counts one request against the key's per-minute limit; 429 once it is spent. Shared by the
    API (``principal``) and the dashboard, so a key has one budget whichever way it is used."""
    limit = svc.settings.rate_limit_per_minute
    if not limit:
        return
    minute = int(time.time() // 60)
    key = records.ratelimit_key(who.token_hash, minute)
    pipe = svc.redis.pipeline()
    pipe.incr(key)
    pipe.expire(key, 120)
    count, _ = await pipe.execute()
    if int(count) > limit:
        retry = str(60 - int(time.time()) % 60)
        raise ApiError(429, f"rate limit of {limit} requests per minute reached",
                       headers={"Retry-After": retry})


PrincipalDep = Annotated[auth.Principal, Depends(principal)]


IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9_-]{8,128}$"

DeleteKeyHeader = Annotated[
    str | None,
    Header(pattern=IDEMPOTENCY_KEY_PATTERN,
           description="Repeat a delete safely: for 24 h the same key returns the first answer "
                       "(and finishes a delete whose reply was lost)."),
]
