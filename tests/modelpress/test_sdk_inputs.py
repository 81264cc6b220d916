"""What the SDK and CLI refuse or say without a running service: path segments, base URLs,
client commands under broken server settings, serve's unreachable Redis, result lines, and an
event stream that closes after a job has ended."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from app.schemas import Environment, IntrinsicDimensionResult, Job
from modelpress import (
    APIResponseValidationError,
    APIStatusError,
    AsyncClient,
    Client,
    InvalidArgumentError,
    ModelpressError,
    _base,
)
from modelpress._stack import free_port
from modelpress.cli import format_result, main
from tests.helpers import ScriptedHandler, serving

JOB_ID = "job_" + "0" * 32


@pytest.mark.parametrize("bad", ["", ".", "..", "../models", "a/b", "a\\b", "/"])
def test_ids_and_names_must_be_one_path_segment(bad: str) -> None:
    builders: list[Callable[[str], object]] = [
        _base.get_job, _base.get_model, _base.get_dataset, _base.delete_job, _base.delete_model,
        _base.delete_dataset, _base.events_path, _base.list_artifacts,
        lambda i: _base.job_log(i, 10), lambda i: _base.cancel_job(i, False)]
    for build in builders:
        with pytest.raises(InvalidArgumentError, match=r"is not a valid .* id"):
            build(bad)
    with pytest.raises(InvalidArgumentError, match="not a valid artifact name"):
        _base.artifact_path(JOB_ID, bad)
    with pytest.raises(InvalidArgumentError, match="not a valid artifact name"):
        _base.download_paths("/tmp/x/a/b/", bad)
    assert issubclass(InvalidArgumentError, ValueError) and issubclass(InvalidArgumentError,
                                                                       ModelpressError)


def test_path_segments_are_percent_encoded() -> None:
    assert _base.get_job(JOB_ID).path == f"/v1/jobs/{JOB_ID}"
    assert _base.artifact_path(JOB_ID, "model.onnx") == f"/v1/jobs/{JOB_ID}/artifacts/model.onnx"
    assert _base.artifact_path(JOB_ID, "a b?#%.json").endswith("/artifacts/a%20b%3F%23%25.json")
    assert _base.events_path("x..y") == "/v1/jobs/x..y/events"
    assert _base.download_paths("/tmp/out/", "b.json") == (Path("/tmp/out/b.json"),
                                                           Path("/tmp/out/b.json.part"))


@pytest.mark.parametrize("url", ["127.0.0.1:8765", "ftp://127.0.0.1:8765", "localhost",
                                 "http://", "http://[::1"])
def test_a_base_url_that_is_not_http_fails_at_once(url: str, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    monkeypatch.setattr(_base, "backoff_seconds", _no_retry)  # was 4 attempts, 3.5 s of backoff
    with pytest.raises(InvalidArgumentError, match="base URL"):
        Client(base_url=url, api_key="k").jobs.list()
    with pytest.raises(InvalidArgumentError, match="base URL"):
        AsyncClient(base_url=url, api_key="k")
    monkeypatch.setenv("MODELPRESS_BASE_URL", url)
    with pytest.raises(InvalidArgumentError, match="base URL"):
        Client(api_key="k")
    assert Client(base_url="https://example.invalid/prefix/", api_key="k").base_url == \
        "https://example.invalid/prefix"


def _no_retry(*_: object) -> float:
    raise AssertionError("the client backed off to retry an error a retry cannot fix")


def test_an_unusable_request_url_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    # the check at construction bypassed (an http_client's base_url changed afterwards)
    monkeypatch.setattr(_base, "backoff_seconds", _no_retry)
    with Client(base_url="http://127.0.0.1:1", api_key="k") as c:
        c._http.base_url = "ftp://127.0.0.1:1"  # type: ignore[assignment]
        with pytest.raises(InvalidArgumentError, match="not usable"):
            c.jobs.list()
        with pytest.raises(InvalidArgumentError, match="not usable"):
            list(c.jobs.events(JOB_ID))


@pytest.mark.parametrize("setting", [{"MODELPRESS_VISIBILITY_TIMEOUT_S": "10"},
                                     {"MODELPRESS_RATE_LIMIT_PER_MINUTE": "abc"}])
def test_client_commands_ignore_server_settings(setting: dict[str, str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(_base, "backoff_seconds", lambda *_: 0.0)  # retrying a dead port: no wait
    dead = f"http://127.0.0.1:{free_port()}"
    for auth in (["--base-url", dead, "--api-key", "k"], ["--base-url", dead], []):
        env = {**setting, "MODELPRESS_DATA_DIR": str(tmp_path / "data"),
               "MODELPRESS_BASE_URL": "", "MODELPRESS_API_KEY": ""}
        result = CliRunner().invoke(main, [*auth, "jobs", "get", JOB_ID], env=env)
        # it got as far as the connection: the SDK's error, not the settings' ValidationError
        assert isinstance(result.exception, ModelpressError), result.exception


def test_client_commands_find_the_data_folder_in_dot_env(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MODELPRESS_DATA_DIR", raising=False)
    (tmp_path / ".env").write_text("MODELPRESS_DATA_DIR=elsewhere\nMODELPRESS_VISIBILITY_TIMEOUT_S=1\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "url").write_text("127.0.0.1:9\n")  # refused: proves it was read
    result = CliRunner().invoke(main, ["jobs", "get", JOB_ID],
                                env={"MODELPRESS_BASE_URL": "", "MODELPRESS_API_KEY": ""})
    assert isinstance(result.exception, InvalidArgumentError)
    assert "'127.0.0.1:9'" in str(result.exception)


def test_serve_names_an_unreachable_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    result = CliRunner().invoke(main, ["serve", "--exit"],
                                env={"MODELPRESS_REDIS_URL": url,
                                     "MODELPRESS_DATA_DIR": str(tmp_path / "data")})
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    said = " ".join(result.output.split())
    assert f"could not reach Redis at {url.replace('hunter2', '***')}" in said
    assert "unset MODELPRESS_REDIS_URL" in said and "hunter2" not in said


@pytest.mark.parametrize("command", [["api"], ["worker"], ["serve", "--exit"],
                                     ["keys", "create", "--tenant", "t"]])
def test_server_commands_name_a_bad_setting_in_one_line(command: list[str], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for env, says in [
        ({"MODELPRESS_VISIBILITY_TIMEOUT_S": "10"},
         "MODELPRESS_VISIBILITY_TIMEOUT_S (10) must be larger than"),
        ({"MODELPRESS_RATE_LIMIT_PER_MINUTE": "abc"},
         "MODELPRESS_RATE_LIMIT_PER_MINUTE: Input should be a valid integer"),
    ]:
        result = CliRunner().invoke(main, command, env=env)
        assert result.exit_code == 1, result.exception
        assert not isinstance(result.exception, ValueError), result.exception  # no traceback
        said = " ".join(result.output.split())
        assert f"invalid settings (environment or .env): {says}" in said, said


def _intrinsic_job(d_int90: int | None, per_seed: list[int | None], rebuilt: float | None,
                   ratio: float | None) -> Job:
    env = Environment(device="cpu", device_name="cpu", threads=1, versions={}, host="h")
    res = IntrinsicDimensionResult(
        model="digits-mlp", projection="dense", parameters=12345, full_accuracy=0.97,
        target=0.873, d_int90=d_int90, d_int90_per_seed=per_seed, curve=[], training_runs=6,
        rebuilt_accuracy=rebuilt, compression_ratio=ratio, seconds=1.0, method="m",
        environment=env)
    return Job.model_validate({
        "id": JOB_ID, "kind": "intrinsic_dimension", "state": "succeeded", "queue": "cpu",
        "spec": {"kind": "intrinsic_dimension", "model": "digits-mlp"},
        "created_at": "2026-12-01T00:00:00Z", "progress": {}, "result": res.model_dump()})


def test_intrinsic_dimension_not_reached_reads_as_such() -> None:
    text = format_result(_intrinsic_job(None, [None, 400], None, None))
    assert "None" not in text, text
    assert "d_int90 not reached of D 12,345 (per seed [not reached, 400])" in text
    assert "no model rebuilt (the target was not reached)" in text
    text = format_result(_intrinsic_job(400, [400], 0.88, 30.4))
    assert "d_int90 400 of D 12,345 (per seed [400])" in text
    assert "rebuilt from the artifact: accuracy 0.88, compression 30x" in text


@pytest.fixture
def closing_stream() -> Iterator[tuple[str, list[str]]]:
    """An events route that sends one progress event and closes (no final state event), and
    a job route that says the job has succeeded: a server that ends the stream of a job that
    had ended before the client resumed."""
    seen: list[str] = []
    progress = json.dumps({"id": "5-0", "type": "progress", "job_id": JOB_ID,
                           "at": "2026-12-01T00:00:00Z", "fraction": 1.0})

    class Handler(ScriptedHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            if self.path.endswith("/events"):
                self.answer(200, f"id: 5-0\ndata: {progress}\n\n".encode(), "text/event-stream")
            else:
                self.answer(200, json.dumps({
                    "id": JOB_ID, "kind": "benchmark", "state": "succeeded", "queue": "cpu",
                    "spec": {"kind": "benchmark", "model": {"id": "mdl_" + "0" * 32}},
                    "created_at": "2026-12-01T00:00:00Z", "progress": {}}).encode())

    with serving(Handler) as url:
        yield url, seen


def test_a_stream_that_closes_after_the_job_ended_stops(closing_stream: tuple[str, list[str]]
                                                        ) -> None:
    url, seen = closing_stream
    with Client(base_url=url, api_key="k") as c:
        assert [e.type for e in c.jobs.events(JOB_ID, last_event_id="4-0")] == ["progress"]

    async def via_async() -> list[str]:
        async with AsyncClient(base_url=url, api_key="k") as ac:
            return [e.type async for e in ac.jobs.events(JOB_ID, last_event_id="4-0")]

    assert asyncio.run(via_async()) == ["progress"]
    assert seen == [f"/v1/jobs/{JOB_ID}/events", f"/v1/jobs/{JOB_ID}"] * 2


def test_the_local_servers_key_goes_to_the_local_server_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelpress._base import resolve_auth

    data = tmp_path / ".modelpress"
    data.mkdir()
    (data / "url").write_text("http://127.0.0.1:8123\n")
    (data / "api-key").write_text("mp_local\n")
    monkeypatch.setenv("MODELPRESS_DATA_DIR", str(data))
    for var in ("MODELPRESS_BASE_URL", "MODELPRESS_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_auth(None, None) == ("http://127.0.0.1:8123", "mp_local")
    assert resolve_auth(None, "http://localhost:9000/") == ("http://localhost:9000", "mp_local")
    # another address: the local key is not sent there (its server answers 401)
    assert resolve_auth(None, "https://press.example.com") == ("https://press.example.com", None)
    monkeypatch.setenv("MODELPRESS_BASE_URL", "https://press.example.com")
    assert resolve_auth(None, None) == ("https://press.example.com", None)
    assert resolve_auth("mp_given", None) == ("https://press.example.com", "mp_given")
    (data / "url").write_text("https://press.example.com\n")  # what serve wrote: its own key
    assert resolve_auth(None, None) == ("https://press.example.com", "mp_local")


def test_the_cli_sends_the_local_key_to_the_local_server_only(tmp_path: Path) -> None:
    """`--base-url` naming another server: the CLI sends no key there; the server's 401 says
    to give one. (An address that does not answer: the request fails before any key matters,
    so a real local HTTP server records the Authorization header it got.)"""
    got: list[str | None] = []

    class Handler(ScriptedHandler):
        def do_GET(self) -> None:
            got.append(self.headers.get("Authorization"))
            self.answer(401, b'{"error": {"type": "unauthorized", "message": "give a key"}}')

    data = tmp_path / ".modelpress"
    data.mkdir()
    (data / "api-key").write_text("mp_local\n")
    with serving(Handler, "127.0.0.2") as url:
        env = {"MODELPRESS_DATA_DIR": str(data), "MODELPRESS_API_KEY": None,
               "MODELPRESS_BASE_URL": None}
        out = CliRunner().invoke(main, ["--base-url", url, "jobs", "list"], env=env)
        assert out.exit_code == 1 and got == [None], (out.output, got)
        # and the error says how to give one (the server's own message is about the header)
        assert "no API key was sent: pass api_key=... to the client (the CLI's --api-key) or " \
            "set MODELPRESS_API_KEY" in str(out.exception)
        out = CliRunner().invoke(main, ["--base-url", url, "--api-key", "k", "jobs", "list"],
                                 env=env)
        assert str(out.exception) == "401: give a key"  # one was sent: it is the key that's wrong


@pytest.fixture
def another_service() -> Iterator[str]:
    """An address where something other than the modelpress API answers 200 to every GET (a
    proxy's sign-in page, another program on that port); its event stream is a JSON body."""

    class Handler(ScriptedHandler):
        def do_GET(self) -> None:
            body, ctype = b"<html>sign in</html>", "text/html"
            if self.path.startswith("/old/"):  # an http:// address a proxy sends to https://
                self.answer(301, b"", Location=f"https://press.example.com{self.path[4:]}")
                return
            if self.path.endswith("/job_1/events"):
                body, ctype = b'{"data": "not a job event"}', "application/json"
            elif self.path.endswith("/job_2/events"):  # an event of another version
                body, ctype = b'id: 1-0\ndata: {"id": "1-0", "type": "metric"}\n\n', \
                    "text/event-stream"
            self.answer(200, body, ctype)

    with serving(Handler) as url:
        yield url


def test_an_answer_that_is_not_the_apis_is_a_typed_error(another_service: str) -> None:
    # It was pydantic's ValidationError ("Invalid JSON: expected value at line 1 column 1"),
    # which is no ModelpressError: the CLI printed a traceback, and nothing said which address
    # answered or what to check.
    url = another_service
    said = (rf"GET /v1/models at {url} answered 200 \(text/html\) with a body this SDK cannot "
            rf"read: .*Is {url} the modelpress API \(base_url, MODELPRESS_BASE_URL\)\?")
    with Client(base_url=url, api_key="k") as c:
        with pytest.raises(APIResponseValidationError, match=said):
            c.models.list()
        with pytest.raises(APIResponseValidationError, match="the event stream of job_1 at"):
            list(c.jobs.events("job_1"))
        with pytest.raises(APIResponseValidationError,
                           match=r"the event stream of job_2 at .*: type: Input should be"):
            list(c.jobs.events("job_2"))

    async def via_async() -> None:
        async with AsyncClient(base_url=url, api_key="k") as ac:
            with pytest.raises(APIResponseValidationError, match=said):
                await ac.models.list()
            with pytest.raises(APIResponseValidationError, match="the event stream of job_1 at"):
                await ac.jobs.wait("job_1")
            with pytest.raises(APIResponseValidationError, match="the event stream of job_2 at"):
                await ac.jobs.wait("job_2")

    asyncio.run(via_async())
    assert issubclass(APIResponseValidationError, ModelpressError)
    result = CliRunner().invoke(main, ["--base-url", url, "--api-key", "k", "models", "list"])
    assert isinstance(result.exception, APIResponseValidationError)  # run() prints one line


def test_a_redirect_says_where_to_point_the_client(another_service: str) -> None:
    # It was "301: " and the proxy's page (or nothing): no word of the redirect or its target.
    said = (rf"301: GET {another_service}/old/v1/jobs/job_1 is redirected to "
            r"https://press\.example\.com/v1/jobs/job_1; set the base URL \(base_url, "
            r"MODELPRESS_BASE_URL\) to the address the API answers on")
    with Client(base_url=f"{another_service}/old", api_key="k") as c:
        with pytest.raises(APIStatusError, match=said):
            c.jobs.get("job_1")
        with pytest.raises(APIStatusError, match="/events is redirected to https://press"):
            list(c.jobs.events("job_1"))
