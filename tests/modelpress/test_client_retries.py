"""The SDK's retry, backoff and error mapping against a real HTTP server on a socket."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from modelpress import (
    APIConnectionError,
    AsyncClient,
    Client,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    _base,
)
from modelpress._stack import free_port


class Script:
    """Statuses to answer with, in order; the last one repeats."""

    def __init__(self) -> None:
        self.statuses: list[int] = [200]
        self.seen: list[str] = []


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            script.seen.append(self.path)
            status = script.statuses.pop(0) if len(script.statuses) > 1 else script.statuses[0]
            body = (json.dumps({"items": []}) if status == 200 else json.dumps(
                {"error": {"type": "x", "message": f"scripted {status}", "fields": []}})).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status in (429, 503):
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    httpd.shutdown()


def test_retries_5xx_and_429_then_succeeds(server: tuple[str, Script]) -> None:
    url, script = server
    script.statuses = [503, 429, 502, 200]
    with Client(base_url=url, api_key="k", max_retries=3) as c:
        assert c.models.list() == []
    assert len(script.seen) == 4


def test_gives_up_with_typed_errors(server: tuple[str, Script]) -> None:
    url, script = server
    script.statuses = [503]
    with Client(base_url=url, api_key="k", max_retries=1) as c, \
            pytest.raises(InternalServerError, match="scripted 503"):
        c.models.list()
    assert len(script.seen) == 2
    script.statuses = [429]
    with Client(base_url=url, api_key="k", max_retries=0) as c, pytest.raises(RateLimitError):
        c.models.list()
    script.statuses = [404]
    script.seen.clear()
    with Client(base_url=url, api_key="k", max_retries=3) as c, pytest.raises(NotFoundError):
        c.models.list()
    assert len(script.seen) == 1  # a 404 is not retried


def test_connection_refused_is_a_connection_error() -> None:
    with Client(base_url=f"http://127.0.0.1:{free_port()}", api_key="k", max_retries=1) as c, \
            pytest.raises(APIConnectionError, match="could not reach"):
        c.models.list()


def test_an_unreachable_default_address_says_where_it_came_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELPRESS_BASE_URL", raising=False)
    monkeypatch.setenv("MODELPRESS_DATA_DIR", str(tmp_path / ".modelpress"))  # no url file
    monkeypatch.setattr(_base, "DEFAULT_BASE_URL", f"http://127.0.0.1:{free_port()}")
    with Client(api_key="k", max_retries=0) as c, \
            pytest.raises(APIConnectionError, match=r"the default address: no base_url, no "
                          r"MODELPRESS_BASE_URL and no .*/url here"):
        c.models.list()
    # an address that was chosen gets no such hint
    with Client(base_url=_base.DEFAULT_BASE_URL, api_key="k", max_retries=0) as c, \
            pytest.raises(APIConnectionError) as info:
        c.models.list()
    assert "default address" not in str(info.value)


def test_async_client_retries(server: tuple[str, Script]) -> None:
    url, script = server
    script.statuses = [503, 200]

    async def go() -> list[object]:
        async with AsyncClient(base_url=url, api_key="k") as c:
            return list(await c.models.list())

    assert asyncio.run(go()) == []
    assert len(script.seen) == 2
