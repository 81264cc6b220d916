"""Redis gone for longer than the API retries: requests answer 503 with Retry-After (they can
succeed later), not 500."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from modelpress import _stack


def test_requests_answer_503_while_redis_is_unreachable() -> None:
    port = _stack.free_port()  # nothing listens there
    app = create_app(Settings(redis_url=f"redis://127.0.0.1:{port}/0", redis_retry_s=0.5))
    with TestClient(app) as http:
        r = http.get("/v1/jobs", headers={"Authorization": "Bearer mp_" + "x" * 43})
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "unavailable" and "Redis" in r.json()["error"]["message"]
    assert r.headers["Retry-After"] == "5"


def test_dashboard_pages_answer_an_html_503_while_redis_is_unreachable() -> None:
    port = _stack.free_port()
    app = create_app(Settings(redis_url=f"redis://127.0.0.1:{port}/0", redis_retry_s=0.5))
    with TestClient(app) as http:
        http.cookies.set("modelpress_key", "mp_" + "x" * 43)
        page = http.get("/ui/jobs")
        fragment = http.get("/ui/jobs/job_" + "0" * 32 + "/log", headers={"HX-Request": "true"})
        api = http.get("/v1/jobs", headers={"Authorization": "Bearer mp_" + "x" * 43})
    assert page.status_code == 503 and page.headers["content-type"].startswith("text/html")
    assert 'id="unavailable"' in page.text and page.headers["Retry-After"] == "5"
    # htmx swaps no 5xx: the message goes to the page's flash box instead
    assert fragment.status_code == 200 and fragment.headers["HX-Retarget"] == "#flash"
    assert fragment.text.startswith("The job store (Redis) is unavailable")
    assert api.status_code == 503 and api.json()["error"]["type"] == "unavailable"
