"""Redis clients for the API and the workers that ride out a Redis restart.

redis-py's default retries a failing command for about 3 s at most, and not at all when the
restarted server has closed a pooled connection. A restart (AOF reload, a container coming back)
takes longer than that, and a job hours in should not fail for it; so connection errors and
timeouts are retried with backoff (0.1 s doubling to 2 s) for about ``redis_retry_s`` seconds.
As with redis-py's own retries, a command whose reply was lost to the restart may run twice.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError
from redis.retry import Retry

from app.config import Settings

_BASE_S, _CAP_S = 0.1, 2.0
_ERRORS = [ConnectionError, TimeoutError]


def retries_for(seconds: float) -> int:
    """How many backoff steps add up to ``seconds``."""
    n, total = 0, 0.0
    while total < seconds:
        total += min(_CAP_S, _BASE_S * 2**n)
        n += 1
    return n


def sync_client(settings: Settings, **kwargs: Any) -> redis.Redis:
    assert settings.redis_url, "MODELPRESS_REDIS_URL is not set"
    retry = Retry(ExponentialBackoff(cap=_CAP_S, base=_BASE_S), retries_for(settings.redis_retry_s))
    return redis.Redis.from_url(settings.redis_url, decode_responses=True, retry=retry,
                                retry_on_error=_ERRORS, **kwargs)


def async_client(settings: Settings, **kwargs: Any) -> aioredis.Redis:
    assert settings.redis_url, "MODELPRESS_REDIS_URL is not set"
    retry = AsyncRetry(ExponentialBackoff(cap=_CAP_S, base=_BASE_S),
                       retries_for(settings.redis_retry_s))
    return aioredis.from_url(settings.redis_url, decode_responses=True, retry=retry,
                             retry_on_error=_ERRORS, **kwargs)
