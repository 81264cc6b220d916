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
