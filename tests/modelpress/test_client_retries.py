"""The SDK's retry, backoff and error mapping against a real HTTP server on a socket."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from modelpress import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    Client,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    WaitTimeoutError,
    _base,
)
from modelpress._stack import free_port
from tests.helpers import ScriptedHandler, serving

ARTIFACT = b"the artifact's bytes"
FINAL = json.dumps({"id": "1-0", "type": "state", "job_id": "job_1", "at": "2026-12-01T00:00:00Z",
                    "state": "succeeded"})

PROGRESS = json.dumps({"id": "0-1", "type": "progress", "job_id": "job_1",
                       "at": "2026-12-01T00:00:00Z", "fraction": 0.5})


class Script:
    """Statuses to answer with, in order; the last one repeats. A 200 on an event stream sends
    keep-alives (and the final state event once ``finish`` is set), on an artifact its bytes."""

    def __init__(self) -> None:
        self.statuses: list[int] = [200]
        self.seen: list[str] = []
        self.posts: list[tuple[str, dict[str, str], int]] = []  # path, headers, body size
        self.finish = False
        self.short_streams = 0  # event streams to close after one keep-alive, job still queued
        self.cut_mid_event = 0  # event streams to close after an event's data line, before its end
        self.job_state = "queued"  # what GET /v1/jobs/job_1 says
        self.job_delay = 0.0  # seconds GET /v1/jobs/job_1 takes to answer (a slow API)
        self.retry_after = "0"  # the Retry-After of a 429 or 503


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(ScriptedHandler):
        def _status(self) -> int:
            return script.statuses.pop(0) if len(script.statuses) > 1 else script.statuses[0]

        def answer(self, status: int, body: bytes, ctype: str = "application/json",
                   **headers: str) -> None:
            if status in (429, 503):
                headers = {"Retry-After": script.retry_after, **headers}
            super().answer(status, body, ctype, **headers)

        def _error(self, status: int) -> None:
            self.answer(status, json.dumps(
                {"error": {"type": "x", "message": f"scripted {status}", "fields": []}}).encode())

        def do_GET(self) -> None:
            script.seen.append(self.path)
            status = self._status()
            if status != 200:
                self._error(status)
            elif self.path.endswith("/events"):
                self._stream()
            elif "/artifacts/" in self.path:
                self.answer(200, ARTIFACT, "application/octet-stream",
                             ETag=f'"{hashlib.sha256(ARTIFACT).hexdigest()}"')
            elif self.path == "/v1/jobs/job_1":
                time.sleep(script.job_delay)
                self.answer(200, json.dumps({
                    "id": "job_1", "kind": "benchmark", "state": script.job_state,
                    "queue": "cpu", "spec": {"kind": "benchmark", "model": {"zoo": "digits-cnn"}},
                    "created_at": "2026-12-01T00:00:00Z", "progress": {}}).encode())
            else:
                self.answer(200, json.dumps({"items": []}).encode())

        def _stream(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            try:
                if script.cut_mid_event > 0:  # cut between an event's data and its blank line
                    script.cut_mid_event -= 1
                    self.wfile.write(f"id: 0-1\ndata: {PROGRESS}\n".encode())
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if script.short_streams > 0:  # a proxy's or a restart's cut: the job goes on
                    script.short_streams -= 1
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
                    self.close_connection = True
                    return
                for _ in range(100):  # 10 s of keep-alives at most
                    if script.finish:
                        self.wfile.write(f"id: 1-0\ndata: {FINAL}\n\n".encode())
                        self.wfile.flush()
                        return
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:  # the client went away
                pass
            self.close_connection = True

        def do_POST(self) -> None:
            size = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(size)
            script.posts.append((self.path, dict(self.headers), size))
            status = self._status()
            if status != 200:
                self._error(status)
                return
            record = {"id": "mdl_1", "name": "x", "format": "hf", "size": size,
                      "sha256": "0" * 64, "created_at": "2026-12-01T00:00:00Z"}
            if self.path.startswith("/v1/datasets"):
                record |= {"id": "dst_1", "format": "npz", "tensors": {}}
            self.answer(201, json.dumps(record).encode())

    with serving(Handler) as url:
        yield url, script


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


def test_wait_timeout_fires_while_only_keep_alives_arrive(server: tuple[str, Script]) -> None:
    # a job that sits queued: the stream sends nothing but keep-alives
    url, _ = server
    _waits_time_out(url, within=3.0)
    assert issubclass(WaitTimeoutError, TimeoutError)


def _waits_time_out(url: str, within: float) -> None:
    """``wait("job_1", timeout=0.5)`` raises WaitTimeoutError within ``within`` seconds, from
    the sync client and from the async one."""
    with Client(base_url=url, api_key="k") as c:
        start = time.monotonic()
        with pytest.raises(WaitTimeoutError, match=r"did not finish within 0\.5 s"):
            c.jobs.wait("job_1", timeout=0.5)
        assert time.monotonic() - start < within

    async def go() -> None:
        async with AsyncClient(base_url=url, api_key="k") as ac:
            await ac.jobs.wait("job_1", timeout=0.5)

    start = time.monotonic()
    with pytest.raises(WaitTimeoutError):
        asyncio.run(go())
    assert time.monotonic() - start < within


def test_event_streams_and_downloads_ride_out_5xx(server: tuple[str, Script],
                                                  tmp_path: Path) -> None:
    url, script = server
    script.finish = True
    script.statuses = [503, 502, 200]
    with Client(base_url=url, api_key="k") as c:
        assert [e.state for e in c.jobs.events("job_1")] == ["succeeded"]
        script.statuses = [503, 200]
        got = c.jobs.download("job_1", "a.bin", tmp_path / "a.bin")
        assert got.read_bytes() == ARTIFACT and not (tmp_path / "a.bin.part").exists()
        script.statuses = [404]
        with pytest.raises(NotFoundError):
            c.jobs.download("job_1", "b.bin", tmp_path / "b.bin")
        with pytest.raises(NotFoundError):  # a folder to make: made only for a file to put in it
            c.jobs.download("job_1", "b.bin", f"{tmp_path}/new/")
        assert not (tmp_path / "new").exists()
        script.statuses = [200]
        assert c.jobs.download("job_1", "b.bin", f"{tmp_path}/new/") == tmp_path / "new" / "b.bin"
    assert len(script.seen) == 3 + 2 + 1 + 1 + 1

    async def go() -> tuple[list[str | None], bytes]:
        async with AsyncClient(base_url=url, api_key="k") as ac:
            script.statuses = [503, 200]
            states: list[str | None] = [e.state async for e in ac.jobs.events("job_1")]
            script.statuses = [503, 200]
            path = await ac.jobs.download("job_1", "c.bin", tmp_path)
            return states, path.read_bytes()

    assert asyncio.run(go()) == (["succeeded"], ARTIFACT)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_async_client_runs_under_asyncio_and_trio(server: tuple[str, Script],
                                                      tmp_path: Path, backend: str) -> None:
    """Each call retried once, so each waits out a pause on the running event loop's clock."""
    url, script = server
    script.finish = True

    async def go() -> tuple[list[object], list[str | None], bytes]:
        async with AsyncClient(base_url=url, api_key="k") as ac:
            script.statuses = [503, 200]
            models = list(await ac.models.list())
            script.statuses = [503, 200]
            states = [e.state async for e in ac.jobs.events("job_1")]
            script.statuses = [503, 200]
            path = await ac.jobs.download("job_1", "c.bin", tmp_path)
            return models, states, path.read_bytes()

    assert anyio.run(go, backend=backend) == ([], ["succeeded"], ARTIFACT)
    assert len(script.seen) == 6


def test_an_unreachable_event_stream_is_a_typed_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(base_url=url, api_key="k", max_retries=1) as c, \
            pytest.raises(APIConnectionError, match="the event stream of job_1 failed"):
        list(c.jobs.events("job_1"))


def test_a_retried_upload_reuses_its_idempotency_key_and_a_folder_is_named(
        server: tuple[str, Script], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, script = server
    folder = tmp_path / "my-bert"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.chdir(folder)
    script.statuses = [500, 200]
    with Client(base_url=url, api_key="k") as c:
        c.models.upload(".")  # the current folder: named after it, not "" (a 422)
    (path1, headers1, size1), (path2, headers2, size2) = script.posts
    assert "name=my-bert" in path1 and path1 == path2 and size1 == size2 > 0
    assert headers1["Idempotency-Key"] == headers2["Idempotency-Key"]


def test_default_upload_names_are_ones_the_api_takes(server: tuple[str, Script],
                                                     tmp_path: Path) -> None:
    url, script = server
    model = tmp_path / "my model (copy).pt2"
    model.write_bytes(b"x")
    data = tmp_path / ".data[v2].npz"
    data.write_bytes(b"x")
    with Client(base_url=url, api_key="k", max_retries=0) as c:
        c.models.upload(model)
        c.models.upload(model, name="chosen")  # a name given is sent as it is
        c.datasets.upload(data)
    sent = [httpx.URL(path).params["name"] for path, _, _ in script.posts]
    assert sent == ["my model _copy_", "chosen", "data_v2_"]
    assert _base.default_name("(") == "_" and _base.default_name("..") == "upload"


def test_retry_after_is_never_negative() -> None:
    for after in ("-1", "nan", "inf", "Thu, 01 Jan 1970 00:00:00 GMT"):
        wait = _base.backoff_seconds(0, httpx.Response(503, headers={"retry-after": after}))
        assert 0.0 <= wait <= 60.0, after


def test_wait_rides_out_streams_cut_while_the_job_sits_queued(server: tuple[str, Script]
                                                              ) -> None:
    # Each stream connects and sends its keep-alive, then is closed (a proxy's time limit, an
    # API restart) while the job waits in the queue, more times than max_retries: every
    # reconnect worked, so wait() goes on. It gave up with "ended before the job did".
    url, script = server
    script.finish, script.short_streams = True, 4
    with Client(base_url=url, api_key="k", max_retries=1) as c:
        script.job_state = "queued"
        assert [e.state for e in c.jobs.events("job_1")] == ["succeeded"]
    assert script.seen.count("/v1/jobs/job_1/events") == 5

    async def go() -> list[str | None]:
        async with AsyncClient(base_url=url, api_key="k", max_retries=1) as ac:
            return [e.state async for e in ac.jobs.events("job_1")]

    script.short_streams = 4
    assert asyncio.run(go()) == ["succeeded"]
    # a stream that is refused is still counted: the retries run out
    script.short_streams, script.statuses = 0, [503]
    with Client(base_url=url, api_key="k", max_retries=1) as c, \
            pytest.raises(InternalServerError):
        list(c.jobs.events("job_1"))


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A socket that takes connections and never answers (a service stuck on a request)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []

    def take() -> None:
        with contextlib.suppress(OSError):  # closed at the end
            while True:
                held.append(listener.accept()[0])

    threading.Thread(target=take, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for conn in held:
        conn.close()


def test_a_call_that_times_out_says_which_and_how_to_give_it_time(silent_server: str) -> None:
    # was "timed out: timed out": no call, no limit, nothing to change
    said = (r"GET /v1/models at http://127\.0\.0\.1:\d+ ran past the read limit of 0\.2 s on all "
            r"2 tries.*Client\(timeout=\.\.\.\) sets the limits")
    with Client(base_url=silent_server, api_key="k", timeout=0.2, max_retries=1) as c, \
            pytest.raises(APITimeoutError, match=said):
        c.models.list()

    async def go() -> None:
        async with AsyncClient(base_url=silent_server, api_key="k", timeout=0.2,
                               max_retries=1) as ac:
            await ac.models.list()

    with pytest.raises(APITimeoutError, match=said):
        asyncio.run(go())


def test_an_event_cut_off_before_its_end_is_dropped(server: tuple[str, Script]) -> None:
    # The first stream ends after an event's data line but before the blank line that ends it;
    # the event is incomplete, so it is not dispatched (as EventSource does) and its data does
    # not run into the next event's. It did: the two payloads joined were not JSON.
    url, script = server
    script.finish, script.cut_mid_event = True, 1
    with Client(base_url=url, api_key="k") as c:
        assert [e.state for e in c.jobs.events("job_1")] == ["succeeded"]

    async def go() -> list[str | None]:
        async with AsyncClient(base_url=url, api_key="k") as ac:
            return [e.state async for e in ac.jobs.events("job_1")]

    script.cut_mid_event = 1
    assert asyncio.run(go()) == ["succeeded"]
    assert script.seen.count("/v1/jobs/job_1/events") == 4


@pytest.fixture
def unanswered_connect() -> Iterator[str]:
    """An address whose connects hang (its accept queue full, so SYNs go unanswered): a host
    cut off by a firewall or a partition."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    filler = socket.create_connection(listener.getsockname(), timeout=2)
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect(listener.getsockname())
    except TimeoutError:  # the queue is full: a connect now hangs (Linux)
        pass
    else:
        for s in (probe, filler, listener):
            s.close()
        pytest.skip("this kernel accepts connects past a full accept queue")
    yield url
    for s in (probe, filler, listener):
        s.close()


def test_wait_timeout_bounds_a_connect_that_hangs(unanswered_connect: str) -> None:
    # the stream's connect waited 60 s whatever the wait had left
    _waits_time_out(unanswered_connect, within=5.0)


@pytest.mark.parametrize("slow", ["answer", "retry-after"])
def test_wait_timeout_bounds_the_final_read_of_the_job(server: tuple[str, Script], slow: str
                                                       ) -> None:
    # The stream ends with the final event at once; then the GET of the job record is slow (an
    # answer that takes 3 s, or 503s asking to come back in 2 s). That GET ran under the
    # client's own limits and retries (60 s reads, 3 retries), not the wait's 0.5 s.
    url, script = server
    script.finish = True
    if slow == "answer":
        script.job_delay = 3.0
    else:
        script.statuses, script.retry_after = [200, 503], "2"
    said = r"job job_1 ended, but its record could not be read within 0\.5 s"
    with Client(base_url=url, api_key="k") as c:
        start = time.monotonic()
        with pytest.raises(WaitTimeoutError, match=said):
            c.jobs.wait("job_1", timeout=0.5)
        assert time.monotonic() - start < 2.0

    async def go() -> None:
        async with AsyncClient(base_url=url, api_key="k") as ac:
            await ac.jobs.wait("job_1", timeout=0.5)

    if slow == "retry-after":
        script.statuses = [200, 503]
    start = time.monotonic()
    with pytest.raises(WaitTimeoutError, match=said):
        asyncio.run(go())
    assert time.monotonic() - start < 2.0


def test_event_streams_keep_the_clients_connect_limit(unanswered_connect: str) -> None:
    # Client(timeout=...) sets the limits of every call; the event stream's connect waited
    # 60 s a try whatever the client said (4 minutes before wait() said it could not connect).
    timeout = httpx.Timeout(30.0, connect=0.3)
    said = r"the event stream of job_1 timed out"
    with Client(base_url=unanswered_connect, api_key="k", timeout=timeout, max_retries=0) as c:
        start = time.monotonic()
        with pytest.raises(APITimeoutError, match=said):
            c.jobs.wait("job_1")
        assert time.monotonic() - start < 3.0

    async def go() -> None:
        async with AsyncClient(base_url=unanswered_connect, api_key="k", timeout=timeout,
                               max_retries=0) as ac:
            await ac.jobs.wait("job_1")

    start = time.monotonic()
    with pytest.raises(APITimeoutError, match=said):
        asyncio.run(go())
    assert time.monotonic() - start < 3.0


def test_a_download_that_fails_says_from_where_and_what_to_change(silent_server: str,
                                                                  tmp_path: Path) -> None:
    # was "the download of a.bin timed out: timed out" / "... failed: [Errno 111] Connection
    # refused": no address, no limit, nothing to change
    refused = f"http://127.0.0.1:{free_port()}"
    cases = [(silent_server, APITimeoutError,
              rf"the download of a\.bin from {silent_server} ran past the read limit of 0\.2 s"
              r".*; .*Client\(timeout=\.\.\.\) sets the limits"),
             (refused, APIConnectionError,
              rf"the download of a\.bin from {refused} failed: ")]
    for url, cls, said in cases:
        with Client(base_url=url, api_key="k", timeout=0.2, max_retries=0) as c, \
                pytest.raises(cls, match=said):
            c.jobs.download("job_1", "a.bin", tmp_path)

        async def go(url: str = url) -> None:
            async with AsyncClient(base_url=url, api_key="k", timeout=0.2, max_retries=0) as ac:
                await ac.jobs.download("job_1", "a.bin", tmp_path)

        with pytest.raises(cls, match=said):
            asyncio.run(go())
    assert list(tmp_path.iterdir()) == []


def test_with_options_changes_retries_and_limits_for_its_calls_only(
        server: tuple[str, Script], silent_server: str) -> None:
    url, script = server
    script.statuses = [503]
    with Client(base_url=url, api_key="k", max_retries=2) as c:
        patient = c.with_options(max_retries=4)
        with pytest.raises(InternalServerError):
            patient.models.list()
        assert len(script.seen) == 5
        script.seen.clear()
        with pytest.raises(InternalServerError):
            c.models.list()  # the original keeps its own
        assert len(script.seen) == 3
    with Client(base_url=silent_server, api_key="k", timeout=30, max_retries=0) as c:
        t0 = time.monotonic()
        with pytest.raises(APITimeoutError, match=r"the read limit of 0\.2 s"):
            c.with_options(timeout=0.2).models.list()
        assert time.monotonic() - t0 < 5

    async def go() -> int:
        script.seen.clear()
        async with AsyncClient(base_url=url, api_key="k", max_retries=0) as ac:
            with pytest.raises(InternalServerError):
                await ac.with_options(max_retries=1).models.list()
        return len(script.seen)

    assert asyncio.run(go()) == 2
