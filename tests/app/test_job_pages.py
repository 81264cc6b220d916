"""GET /v1/jobs with filters, at the module level against a real Redis: a page holds up to
`limit` matching jobs however many others lie between them, a cursor comes only while more may
match, and one request reads at most JOB_LIST_SCAN_LIMIT index entries (then says so)."""

from __future__ import annotations

import redis
from fastapi.testclient import TestClient

from app import jobs
from app.auth import create_key
from app.config import Settings
from app.deps import Services
from app.main import create_app
from app.schemas import JOB_LIST_SCAN_LIMIT, JobPage, JobState
from tests.app.conftest import TENANT, put_jobs, run


async def pages(svc: Services, limit: int, state: JobState | None) -> list[JobPage]:
    """Every page of the listing, following the cursors."""
    got = [await jobs.list_jobs(svc, TENANT, limit, None, state, None)]
    while got[-1].next_cursor is not None:
        got.append(await jobs.list_jobs(svc, TENANT, limit, got[-1].next_cursor, state, None))
    return got


def test_the_last_page_of_matches_has_no_cursor(settings: Settings) -> None:
    """Older jobs that do not match follow the last match: no cursor to an empty page."""
    async def body_(svc: Services) -> None:
        ids = await put_jobs(svc, TENANT, ["queued"] * 3 + ["cancelled"] * 2 + ["queued"] * 3)
        page = await jobs.list_jobs(svc, TENANT, 2, None, "cancelled", None)
        assert ([j.id for j in page.items], page.next_cursor) == ([ids[4], ids[3]], None)
        one = await pages(svc, 1, "cancelled")
        assert [[j.id for j in p.items] for p in one] == [[ids[4]], [ids[3]]]
        none = await jobs.list_jobs(svc, TENANT, 5, None, None, "sensitivity")
        assert (none.items, none.next_cursor) == ([], None)
        every = await jobs.list_jobs(svc, TENANT, 8, None, None, None)
        assert ([j.id for j in every.items], every.next_cursor) == (ids[::-1], None)

    run(settings, body_)


def test_pages_fill_past_jobs_that_do_not_match(settings: Settings) -> None:
    async def body_(svc: Services) -> None:
        states: list[JobState] = ["cancelled" if i % 7 == 3 else "queued" for i in range(90)]
        ids = await put_jobs(svc, TENANT, states)
        matching = [i for i, s in zip(ids, states, strict=True) if s == "cancelled"][::-1]
        got = await pages(svc, 4, "cancelled")
        assert [len(p.items) for p in got] == [4, 4, 4, 1]  # 13 matches, every page but the last full
        assert [j.id for p in got for j in p.items] == matching
        assert not any(p.partial for p in got)

    run(settings, body_)


def test_a_request_reads_at_most_its_bound_and_says_so(settings: Settings) -> None:
    """The only matches lie past JOB_LIST_SCAN_LIMIT newer jobs: the first page stops there,
    empty, partial, with a cursor from which the next one finds them."""
    async def body_(svc: Services) -> None:
        old = await put_jobs(svc, TENANT, ["cancelled"] * 2)
        await put_jobs(svc, TENANT, ["queued"] * (JOB_LIST_SCAN_LIMIT + 50))
        got = await pages(svc, 5, "cancelled")
        assert [(len(p.items), p.partial, p.next_cursor is None) for p in got] == [
            (0, True, False), (2, False, True)]
        assert [j.id for j in got[1].items] == old[::-1]
        # unfiltered, a page fills at once
        first = await jobs.list_jobs(svc, TENANT, 5, None, None, None)
        assert (len(first.items), first.partial, first.next_cursor is not None) == (5, False, True)

    run(settings, body_)


def test_a_bound_reached_at_the_index_end_gives_no_cursor(settings: Settings) -> None:
    async def body_(svc: Services) -> None:
        await put_jobs(svc, TENANT, ["queued"] * JOB_LIST_SCAN_LIMIT)
        page = await jobs.list_jobs(svc, TENANT, 5, None, "cancelled", None)
        assert (page.items, page.next_cursor, page.partial) == ([], None, False)

    run(settings, body_)


def test_a_page_filled_at_the_bound_is_not_partial(settings: Settings) -> None:
    """The match that fills the page is the last entry the bound lets a request read: a full
    page with a cursor, not one that says it was cut short."""
    async def body_(svc: Services) -> None:
        older = await put_jobs(svc, TENANT, ["cancelled"])
        await put_jobs(svc, TENANT, ["queued"] * (JOB_LIST_SCAN_LIMIT - 2))
        pair = await put_jobs(svc, TENANT, ["cancelled"] * 2)
        got = await pages(svc, 2, "cancelled")
        assert [(len(p.items), p.partial, p.next_cursor is None) for p in got] == [
            (2, False, False), (1, False, True)]
        assert [j.id for p in got for j in p.items] == [*pair[::-1], *older]

    run(settings, body_)


def test_the_dashboard_says_when_its_filtered_list_was_cut_short(settings: Settings) -> None:
    async def many(svc: Services) -> None:
        await put_jobs(svc, TENANT, ["queued"] * (JOB_LIST_SCAN_LIMIT + 1))

    run(settings, many)
    key = create_key(redis.Redis.from_url(settings.redis_url or "", decode_responses=True),
                     TENANT, "test")
    with TestClient(create_app(settings)) as http:
        http.cookies.set("modelpress_key", key)
        cut = http.get("/ui/jobs", params={"state": "cancelled"})
        whole = http.get("/ui/jobs", params={"state": "queued"})
    assert cut.status_code == 200 and 'id="partial"' in cut.text and 'id="empty"' not in cut.text
    assert whole.status_code == 200 and 'id="partial"' not in whole.text
