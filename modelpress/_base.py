"""What the sync and async clients share: endpoint descriptions, retry policy, SSE decoding."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from app.schemas import (
    FINAL_STATES,
    ArtifactInfo,
    DatasetInfo,
    DatasetList,
    Deleted,
    Health,
    Job,
    JobEvent,
    JobLog,
    JobPage,
    ModelInfo,
    ModelList,
)
from modelpress._errors import (
    APIConnectionError,
    APIResponseValidationError,
    APITimeoutError,
    IntegrityError,
    InvalidArgumentError,
    ModelpressError,
    WaitTimeoutError,
    status_error,
)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Page(Protocol[T_co]):
    """A page of a listing: JobPage, ModelList, DatasetList."""

    @property
    def items(self) -> Sequence[T_co]: ...

    @property
    def next_cursor(self) -> str | None: ...


def every_item(page: Callable[[str | None], Page[T]]) -> Iterator[T]:
    """Every item of a listing, following ``page(cursor)`` from the first page to the last."""
    cursor: str | None = None
    while True:
        got = page(cursor)
        yield from got.items
        if got.next_cursor is None:
            return
        cursor = got.next_cursor


async def every_item_async(page: Callable[[str | None], Awaitable[Page[T]]]
                           ) -> AsyncIterator[T]:
    """:func:`every_item` for the async client."""
    cursor: str | None = None
    while True:
        got = await page(cursor)
        for item in got.items:
            yield item
        if got.next_cursor is None:
            return
        cursor = got.next_cursor
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def segment(value: str, what: str) -> str:
    """``value`` as one percent-encoded URL path segment. An id or artifact name with a path
    separator, or one that is empty, '.' or '..', is refused: in a URL it would name another
    route (``../models`` turns an artifact download into ``GET /v1/models``), and as a file
    name it would write outside the destination folder."""
    if not isinstance(value, str) or value in ("", ".", "..") or "/" in value or "\\" in value:
        raise InvalidArgumentError(f"{value!r} is not a valid {what}: it must be non-empty, not "
                                   "'.' or '..', and contain no '/' or '\\'")
    return quote(value, safe="")


def download_paths(dest: str | Path, name: str) -> tuple[Path, Path]:
    """Where a download goes (``dest``, or ``name`` inside it when it is a folder: one that
    exists, or one written with a trailing slash) and the ``.part`` file it is streamed to
    first. Missing folders are made by ``part_file`` once the server has answered."""
    segment(name, "artifact name")  # joined to dest below: no separators, no '..'
    path = Path(dest)
    if str(dest).endswith(("/", os.sep)) or path.is_dir():
        path = path / name
    return path, path.with_name(path.name + ".part")


def part_file(tmp: Path) -> Path:
    """``tmp``, its folder made: only now, so a refused download leaves no empty folder."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def default_name(text: str) -> str:
    """A file's stem or a folder's name as an upload name the API takes (a letter, digit or _
    first, then those, spaces and . - @ +, at most 128): any other character becomes '_'."""
    name = re.sub(r"[^\w .@+-]", "_", text).lstrip(" .@+-")[:128]
    return name or "upload"


def etag_sha256(response: httpx.Response) -> str | None:
    """The artifact's sha256 from its ETag (the API sends the hex digest, quoted)."""
    tag = response.headers.get("etag", "").strip('"')
    return tag if len(tag) == 64 and all(c in "0123456789abcdef" for c in tag) else None


@contextmanager
def cleaned_up(tmp: Path, name: str, base_url: str, timeout: httpx.Timeout) -> Iterator[None]:
    """A download that fails leaves no ``.part`` behind; one that times out is an
    APITimeoutError, one that cannot connect or is cut off mid-stream (the connection dropped, or
    more or fewer bytes than the server declared) an APIConnectionError."""
    what = f"the download of {name} from {base_url}"
    try:
        yield
    except httpx.TimeoutException as exc:
        _discard(tmp)
        raise APITimeoutError(f"{what} ran past {_limit(exc, timeout)}{_said(exc)}; a large artifact "
                              "or a slow link needs more time: Client(timeout=...) sets the "
                              "limits", request=_request_of(exc)) from exc
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        _discard(tmp)
        raise bad_url(exc) from exc
    except httpx.TransportError as exc:
        _discard(tmp)
        raise APIConnectionError(f"{what} failed: {exc}", request=_request_of(exc)) from exc
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: Path) -> None:
    # NotADirectoryError: the destination's folder is a file (the very error being handled);
    # the error to report is that one, not this cleanup's.
    with suppress(FileNotFoundError, NotADirectoryError):
        tmp.unlink()


def finish_download(tmp: Path, dest: Path, name: str, expected: str | None, actual: str) -> Path:
    """Move a streamed ``.part`` into place, or delete it and raise IntegrityError when its
    sha256 is not the one the server recorded."""
    if expected is not None and actual != expected:
        tmp.unlink()
        raise IntegrityError(name, expected, actual)
    tmp.replace(dest)
    return dest


def _model(cls: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    return lambda r: cls.model_validate_json(r.content)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call: how to send it and how to read the answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, Any] | None = None
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    upload: Path | None = None  # streamed from disk as the raw body, reopened per attempt
    accept: frozenset[int] = frozenset()  # non-2xx statuses whose body is the answer


class _Limited(Protocol):
    _timeout: httpx.Timeout
    max_retries: int


L = TypeVar("L", bound=_Limited)


def with_limits(client: L, timeout: float | httpx.Timeout | None, max_retries: int | None) -> L:
    """A shallow copy of ``client`` (sharing its connection pool) with the limits given; the
    caller binds its resources (models, datasets, jobs) to the copy."""
    copied = copy.copy(client)
    if timeout is not None:
        copied._timeout = httpx.Timeout(timeout)
    if max_retries is not None:
        copied.max_retries = max_retries
    return copied


def resolve_auth(api_key: str | None, base_url: str | None, data_dir: Path | None = None
                 ) -> tuple[str, str | None]:
    """Arguments first, then MODELPRESS_API_KEY / MODELPRESS_BASE_URL, then what a local
    ``modelpress serve`` wrote under its data folder (default: MODELPRESS_DATA_DIR)."""
    if data_dir is None:
        data_dir = Path(os.environ.get("MODELPRESS_DATA_DIR", ".modelpress"))
    local = (data_dir / "url").read_text().strip() if (data_dir / "url").exists() else None
    url = check_base_url((base_url or os.environ.get("MODELPRESS_BASE_URL") or local
                          or DEFAULT_BASE_URL).rstrip("/"))
    key = api_key or os.environ.get("MODELPRESS_API_KEY")
    # The local server's key goes only to the local server: never to another address named by
    # base_url or MODELPRESS_BASE_URL (which then answers 401 and says to give its own key).
    if key is None and (data_dir / "api-key").exists() and _is_local(url, local):
        key = (data_dir / "api-key").read_text().strip()
    return url, key


def _is_local(url: str, local: str | None) -> bool:
    """Whether ``url`` is the address a local serve wrote, or one on this machine."""
    if local is not None and url == local.rstrip("/"):
        return True
    return httpx.URL(url).host in ("127.0.0.1", "localhost", "::1")


def check_base_url(url: str) -> str:
    """``url`` if it is an absolute http(s) address. Anything else (no scheme, ``ftp://``)
    fails the same way on every try: refused here, before any request, not retried."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise InvalidArgumentError(f"base URL {url!r} is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidArgumentError(
            f"base URL {url!r} is not an http:// or https:// address with a host "
            "(e.g. http://127.0.0.1:8000)")
    return url


def bad_url(exc: httpx.UnsupportedProtocol | httpx.InvalidURL) -> InvalidArgumentError:
    """httpx's refusal of a URL (say, an http_client whose base_url was changed afterwards):
    a configuration error that a retry cannot fix."""
    return InvalidArgumentError(f"the request URL is not usable: {exc}")


def default_url_hint(base_url: str | None) -> str:
    """Said when the default address does not answer and nothing chose it."""
    data_dir = Path(os.environ.get("MODELPRESS_DATA_DIR", ".modelpress"))
    if base_url or os.environ.get("MODELPRESS_BASE_URL") or (data_dir / "url").exists():
        return ""
    return (f" (the default address: no base_url, no MODELPRESS_BASE_URL and no {data_dir}/url "
            "here, which `modelpress serve` writes in the folder it runs from)")


def backoff_seconds(attempt: int, response: httpx.Response | None) -> float:
    """Retry-After when the server sends one, else exponential backoff with jitter."""
    if response is not None:
        after = response.headers.get("retry-after")
        if after:
            try:
                seconds = float(after)
            except ValueError:
                try:
                    seconds = parsedate_to_datetime(after).timestamp() - time.time()
                except (TypeError, ValueError):
                    seconds = math.nan
            if math.isfinite(seconds):  # a negative or NaN one would make time.sleep raise
                return max(0.0, min(seconds, 60.0))
    return float(min(0.5 * 2**attempt, 8.0) * (0.75 + random.random() / 2))


def should_retry(response: httpx.Response) -> bool:
    return response.status_code in RETRY_STATUSES


def transport_error(exc: httpx.TransportError, what: str) -> APIConnectionError:
    """A transport failure that outlived the retries, as the SDK's error class."""
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"{what} timed out: {exc}", request=_request_of(exc))
    return APIConnectionError(f"{what} failed: {exc}", request=_request_of(exc))


_PHASES: tuple[tuple[type[httpx.TimeoutException], str], ...] = (
    (httpx.ConnectTimeout, "connect"), (httpx.ReadTimeout, "read"),
    (httpx.WriteTimeout, "write"), (httpx.PoolTimeout, "pool"))


def call_timed_out(call: Call[Any], base_url: str, tries: int, exc: httpx.TimeoutException,
                   timeout: httpx.Timeout) -> APITimeoutError:
    """A call that timed out on every try, as an error that says which call, which limit ran
    out, and how to give it more time (httpx's own message is only "timed out")."""
    return APITimeoutError(
        f"{call.method} {call.path} at {base_url} ran past {_limit(exc, timeout)} on all {tries} "
        f"{'try' if tries == 1 else 'tries'}{_said(exc)}; a slow service or a large upload needs "
        "more time: Client(timeout=...) sets the limits", request=_request_of(exc))


def _said(exc: Exception) -> str:
    return f" ({exc})" if str(exc) else ""  # the async transport's timeouts say nothing


def _limit(exc: httpx.TimeoutException, timeout: httpx.Timeout) -> str:
    """Which of ``timeout``'s limits ``exc`` ran past, in words."""
    phase = next((name for cls, name in _PHASES if isinstance(exc, cls)), None)
    limit = getattr(timeout, phase) if phase else None
    return f"the {phase} limit of {limit:g} s" if phase and limit is not None else "its limit"


def _request_of(exc: httpx.TransportError) -> httpx.Request | None:
    try:
        return exc.request
    except RuntimeError:  # raised without a request attached
        return None


@dataclass(frozen=True)
class Deadline:
    """When ``jobs.wait(timeout=...)`` gives up: checked on every line of the event stream
    (the server's keep-alives included) and bounding each read, so a job that never moves, or
    a stream that sends nothing, still returns control on time. It bounds the GET of the
    job's record once the stream has ended too (``ended``), retries included."""

    job_id: str
    timeout: float
    at: float
    ended: bool = False  # the job has ended: what is left is reading its record

    @classmethod
    def after(cls, job_id: str, timeout: float | None) -> Deadline | None:
        return None if timeout is None else cls(job_id, timeout, time.monotonic() + timeout)

    def left(self) -> float:
        return self.at - time.monotonic()

    def job_ended(self) -> Deadline:
        return replace(self, ended=True)

    def error(self) -> WaitTimeoutError:
        if self.ended:
            return WaitTimeoutError(
                f"job {self.job_id} ended, but its record could not be read within "
                f"{self.timeout} s (the API was slow or unavailable); "
                f"jobs.get({self.job_id!r}) reads it")
        return WaitTimeoutError(f"job {self.job_id} did not finish within {self.timeout} s")

    def check(self) -> None:
        if self.left() < 0:
            raise self.error()


def timeout_within(timeout: httpx.Timeout, deadline: Deadline | None) -> httpx.Timeout:
    """The client's ``timeout`` with no phase longer than the wait has left."""
    if deadline is None:
        return timeout
    left = max(0.05, deadline.left())
    phases = {p: getattr(timeout, p) for p in ("connect", "read", "write", "pool")}
    return httpx.Timeout(**{p: left if v is None else min(v, left) for p, v in phases.items()})


def out_of_time(deadline: Deadline | None, attempt: int, max_retries: int, pause: float
                ) -> bool:
    """Whether a failed try ends a call made within ``deadline``: it has run out, or the next
    try (one is left) would start after it."""
    if deadline is None:
        return False
    left = deadline.left()
    return left <= 0 or (attempt < max_retries and pause >= left)


def gave_up(failure: Exception, call: Call[Any], base_url: str, hint: str, tries: int,
            timeout: httpx.Timeout) -> ModelpressError:
    """The error a call raises when its last try failed with ``failure``: a status error as it
    is, a transport failure as the SDK's error class, saying where and how to fix it."""
    if isinstance(failure, ModelpressError):
        return failure
    if isinstance(failure, httpx.TimeoutException):
        return call_timed_out(call, base_url, tries, failure, timeout)
    assert isinstance(failure, httpx.TransportError)
    return APIConnectionError(f"could not reach {base_url}{hint}: {failure}",
                              request=_request_of(failure))


def stream_timeout(timeout: httpx.Timeout, deadline: Deadline | None) -> httpx.Timeout:
    """The event stream's timeouts: a read waits for the server's keep-alives (every 10 s);
    connecting, writing and waiting for the pool keep the client's limits (at most 60 s); no
    phase (connecting to an address that does not answer included) waits longer than the
    wait has left."""
    left = math.inf if deadline is None else max(0.05, deadline.left() + 0.05)

    def within(limit: float | None) -> float:
        return min(60.0 if limit is None else limit, 60.0, left)

    return httpx.Timeout(connect=within(timeout.connect), read=min(120.0, left),
                         write=within(timeout.write), pool=within(timeout.pool))


def ended_probe_timeout(deadline: Deadline | None) -> httpx.Timeout:
    """One GET of the job, asked when its stream closed without a final event: short, and no
    longer than the wait has left (a ``wait(timeout=...)`` is not held by a slow API)."""
    limit = 10.0 if deadline is None else max(0.05, min(10.0, deadline.left()))
    return httpx.Timeout(limit)


def job_ended(resp: httpx.Response, job_id: str, base_url: str) -> bool:
    """Whether that GET says the job is in a final state. A 404 (deleted) is raised; any other
    failure is False (the API restarting, rate limiting): the caller reconnects as before."""
    if resp.status_code == 404:
        raise status_error(resp)
    if not resp.is_success:
        return False
    return parse(get_job(job_id), resp, base_url).state in FINAL_STATES


def parse(call: Call[T], response: httpx.Response, base_url: str) -> T:
    """``call``'s answer read; a body that is not what the API sends is an
    APIResponseValidationError that says where it came from, not pydantic's error."""
    try:
        return call.parse(response)
    except ValueError as exc:  # pydantic's ValidationError; json's JSONDecodeError
        raise unreadable(f"{call.method} {call.path}", response, base_url, exc) from exc


def unreadable(what: str, response: httpx.Response, base_url: str, exc: ValueError | None
               ) -> APIResponseValidationError:
    """A 2xx answer this SDK cannot read, as an error that says what came back and what to
    check."""
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False)
        where = ".".join(str(p) for p in errors[0]["loc"])
        detail = f"{where + ': ' if where else ''}{errors[0]['msg']}"
        detail += f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    elif exc is not None:
        detail = str(exc)
    else:
        detail = "not an event stream"
    ctype = response.headers.get("content-type") or "no content type"
    return APIResponseValidationError(
        f"{what} at {base_url} answered {response.status_code} ({ctype}) with a body this SDK "
        f"cannot read: {detail}. Is {base_url} the modelpress API (base_url, "
        "MODELPRESS_BASE_URL)? If it is, this SDK and the service are different versions",
        response=response)


def check_event_stream(resp: httpx.Response, job_id: str, base_url: str) -> None:
    """A 2xx event stream that is not ``text/event-stream`` (a proxy's page, another service)
    is refused at once, not read as lines of nothing until it ends."""
    if resp.headers.get("content-type", "").split(";")[0].strip() != "text/event-stream":
        raise unreadable(f"the event stream of {job_id}", resp, base_url, None)


def pause_within(pause: float, deadline: Deadline | None) -> float:
    return pause if deadline is None else max(0.0, min(pause, deadline.left()))


def spec_json(spec: BaseModel | Mapping[str, Any]) -> Any:
    return spec.model_dump(mode="json", exclude_none=True) if isinstance(spec, BaseModel) else spec


class SSEDecoder:
    """Turns ``text/event-stream`` lines into :class:`JobEvent` objects."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._id: str | None = None
        self.last_id: str | None = None

    def new_stream(self) -> None:
        """Drop an event the last connection cut off before its blank line: it is not
        dispatched (as in EventSource), and its data must not run into the next event's."""
        self._data, self._id = [], None

    def feed(self, line: str) -> JobEvent | None:
        """The event ``line`` completes, if any; one whose data is not a job event raises
        ValueError (pydantic's ValidationError, json's JSONDecodeError)."""
        if line == "":
            if not self._data:
                return None
            payload = "\n".join(self._data)
            self._data = []
            event = JobEvent.model_validate(json.loads(payload))
            self.last_id = self._id or event.id
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        return None


# ---------------------------------------------------------------- endpoints


def zip_folder(folder: Path, dest_dir: Path) -> Path:
    """A Hugging Face folder as the zip the API expects (top-level files, no sub-folder)."""
    out = dest_dir / f"{folder.resolve().name or 'model'}-{uuid.uuid4().hex[:8]}.zip"
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    return out


def _upload_headers() -> dict[str, str]:
    # One key per logical upload, reused by every retry: a retry after a timeout or a lost
    # reply (the server may have stored the file) returns that upload instead of a copy.
    return {"Content-Type": "application/octet-stream", "Idempotency-Key": uuid.uuid4().hex}


def upload_model(path: Path, name: str | None, fmt: str | None) -> Call[ModelInfo]:
    params = {"name": name or default_name(path.stem)}
    if fmt:
        params["format"] = fmt
    return Call("POST", "/v1/models", _model(ModelInfo), params=params, upload=path,
                headers=_upload_headers())


def list_models(limit: int, cursor: str | None = None) -> Call[ModelList]:
    params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
    return Call("GET", "/v1/models", _model(ModelList), params=params)


def get_model(model_id: str) -> Call[ModelInfo]:
    return Call("GET", f"/v1/models/{segment(model_id, 'model id')}", _model(ModelInfo))


def _delete_key() -> dict[str, str]:
    # One key per logical delete, reused by every retry: a retry after a lost reply gets the
    # first answer instead of a 404 (and finishes an upload's delete cut short by it).
    return {"Idempotency-Key": uuid.uuid4().hex}


def delete_model(model_id: str) -> Call[Deleted]:
    return Call("DELETE", f"/v1/models/{segment(model_id, 'model id')}", _model(Deleted),
                headers=_delete_key())


def upload_dataset(path: Path, name: str | None, fmt: str | None) -> Call[DatasetInfo]:
    fmt = fmt or {".npz": "npz", ".safetensors": "safetensors"}.get(path.suffix)
    params = {"name": name or default_name(path.stem),
              **({"format": fmt} if fmt else {})}  # else detected
    return Call("POST", "/v1/datasets", _model(DatasetInfo), params=params, upload=path,
                headers=_upload_headers())


def list_datasets(limit: int, cursor: str | None = None) -> Call[DatasetList]:
    params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
    return Call("GET", "/v1/datasets", _model(DatasetList), params=params)


def get_dataset(dataset_id: str) -> Call[DatasetInfo]:
    return Call("GET", f"/v1/datasets/{segment(dataset_id, 'dataset id')}", _model(DatasetInfo))


def delete_dataset(dataset_id: str) -> Call[Deleted]:
    return Call("DELETE", f"/v1/datasets/{segment(dataset_id, 'dataset id')}", _model(Deleted),
                headers=_delete_key())


def create_job(spec: BaseModel | Mapping[str, Any], name: str | None,
               idempotency_key: str | None) -> Call[Job]:
    body: dict[str, Any] = {"spec": spec_json(spec)}
    if name:
        body["name"] = name
    # One key per logical create, reused by every retry, so a retried POST never makes two jobs.
    key = idempotency_key or uuid.uuid4().hex
    return Call("POST", "/v1/jobs", _model(Job), json=body, headers={"Idempotency-Key": key})


def _job_path(job_id: str) -> str:
    return f"/v1/jobs/{segment(job_id, 'job id')}"


def get_job(job_id: str) -> Call[Job]:
    return Call("GET", _job_path(job_id), _model(Job))


def list_jobs(limit: int, cursor: str | None, state: str | None, kind: str | None
              ) -> Call[JobPage]:
    params = {k: v for k, v in {"limit": limit, "cursor": cursor, "state": state,
                                "kind": kind}.items() if v is not None}
    return Call("GET", "/v1/jobs", _model(JobPage), params=params)


def cancel_job(job_id: str, force: bool) -> Call[Job]:
    return Call("POST", f"{_job_path(job_id)}/cancel", _model(Job),
                params={"force": "true"} if force else None)


def delete_job(job_id: str) -> Call[Deleted]:
    return Call("DELETE", _job_path(job_id), _model(Deleted), headers=_delete_key())


def job_log(job_id: str, tail: int) -> Call[list[str]]:
    return Call("GET", f"{_job_path(job_id)}/log",
                lambda r: JobLog.model_validate_json(r.content).lines, params={"tail": tail})


def list_artifacts(job_id: str) -> Call[list[ArtifactInfo]]:
    adapter = TypeAdapter(list[ArtifactInfo])
    return Call("GET", f"{_job_path(job_id)}/artifacts",
                lambda r: adapter.validate_json(r.content))


def health(path: str) -> Call[Health]:
    return Call("GET", path, _model(Health), accept=frozenset({503}))


def events_path(job_id: str) -> str:
    return f"{_job_path(job_id)}/events"


def artifact_path(job_id: str, name: str) -> str:
    return f"{_job_path(job_id)}/artifacts/{segment(name, 'artifact name')}"
