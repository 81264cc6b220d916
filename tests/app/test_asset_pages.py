"""Listing uploads a page at a time, at the module level against a real Redis: every upload once,
newest first, uploads of the same instant neither skipped nor repeated across pages."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import redis

from app import assets, records
from app.config import Settings
from app.deps import Services
from app.schemas import DatasetInfo
from tests.app.conftest import TENANT, run, upload


def test_pages_cover_every_upload_once_in_order(settings: Settings) -> None:
    ids: list[str] = run(settings, lambda svc: _uploads(svc, 11))
    r = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    index = records.tenant_assets_key(TENANT, "datasets")
    # five uploads of one instant (across a page boundary at limit 3), and two of another
    r.zadd(index, dict.fromkeys(ids[2:7], 1_700_000_000.25))
    r.zadd(index, dict.fromkeys(ids[8:10], 1_700_000_001.5))
    r.delete(records.asset_key("datasets", ids[4]))  # deleted between index and read
    want = [i for i, _ in r.zrevrange(index, 0, -1, withscores=True) if i != ids[4]]

    for limit in (1, 3, 4, 500):
        got: list[str] = []
        cursor: str | None = None
        while True:
            items, cursor = run(settings, _page(limit, cursor))
            got += [d.id for d in items]
            if cursor is None:
                assert len(items) <= limit
                break
            assert len(items) == limit  # a full page whenever another follows
        assert got == want, limit


def _page(limit: int, cursor: str | None
          ) -> Callable[[Services], Awaitable[tuple[list[DatasetInfo], str | None]]]:
    async def page(svc: Services) -> tuple[list[DatasetInfo], str | None]:
        return await assets.list_assets(svc, "datasets", TENANT, DatasetInfo, limit, cursor)

    return page


async def _uploads(svc: Services, n: int) -> list[str]:
    return [await upload(svc) for _ in range(n)]
