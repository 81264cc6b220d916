"""The dashboard and the API share a key's per-minute rate limit (the dashboard once bypassed
it); a limited dashboard request gets HTML, and the fragments the job page polls do not count."""

from __future__ import annotations

import time

import httpx

from app.routes.dashboard import COOKIE
from tests.conftest import Stack
from tests.dashboard.conftest import RATE_LIMIT as LIMIT

MISSING_JOB = "job_" + "0" * 32


def test_the_dashboard_counts_against_the_keys_limit(limited_ui_stack: Stack) -> None:
    # The limit's window is the clock's minute: a run that crosses into the next one starts
    # afresh (once at most, as a run takes a few seconds), with a new key.
    for _ in range(2):
        key = limited_ui_stack.key()
        minute = int(time.time() // 60)
        with httpx.Client(base_url=limited_ui_stack.base_url, cookies={COOKIE: key}, timeout=30) as c:
            # the API spends the key's budget ...
            api = [c.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code
                   for _ in range(LIMIT)]
            # ... the job page's polled fragments do not count ...
            log = c.get(f"/ui/jobs/{MISSING_JOB}/log", headers={"HX-Request": "true"})
            # ... and the dashboard's pages and buttons share it
            page = c.get("/ui/jobs")
            button = c.post(f"/ui/jobs/{MISSING_JOB}/cancel", headers={"HX-Request": "true"})
        if int(time.time() // 60) == minute:
            break
    assert api == [200] * LIMIT
    assert page.status_code == 429 and page.headers["content-type"].startswith("text/html")
    assert 'id="rate-limited"' in page.text and f"{LIMIT} requests per minute" in page.text
    assert 0 < int(page.headers["Retry-After"]) <= 60
    # htmx swaps no 429: a 200 shown in the page's flash box, the button left for a retry
    assert button.status_code == 200 and button.headers["HX-Retarget"] == "#flash"
    assert f"{LIMIT} requests per minute" in button.text and "Retry-After" in button.headers
    # polled by htmx every 2 s while a job runs: not counted, so not limited
    assert log.status_code == 286 and "not found" in log.text
