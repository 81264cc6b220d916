"""The asynchronous client; the same surface as :class:`modelpress.Client` with ``await``."""

from __future__ import annotations

import builtins
import hashlib
import os
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import anyio
import httpx
from pydantic import BaseModel

from app.schemas import (
    FINAL_STATES,
    ArtifactInfo,
    DatasetInfo,
    DatasetList,
    Deleted,
    Health,
    Job,
    JobEvent,
    JobPage,
    ModelInfo,
    ModelList,
)
from modelpress import _base
from modelpress._errors import (
    APIConnectionError,
    JobFailedError,
    status_error,
)
from modelpress._progress import ProgressPrinter

T = TypeVar("T")


class AsyncClient:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = _base.DEFAULT_TIMEOUT,
        max_retries: int = 3,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url, self.api_key = _base.resolve_auth(api_key, base_url)
        self._url_hint = _base.default_url_hint(base_url)
        self.max_retries = max_retries
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self._timeout = self._http.timeout  # this client's limits (with_options)
        self._http.base_url = httpx.URL(self.base_url)
        if self.api_key:
            self._http.headers["Authorization"] = f"Bearer {self.api_key}"
        self.models = AsyncModels(self)
        self.datasets = AsyncDatasets(self)
        self.jobs = AsyncJobs(self)

    def with_options(self, *, timeout: float | httpx.Timeout | None = None,
                     max_retries: int | None = None) -> AsyncClient:
        """This client with other limits or retries for the calls made through the copy, e.g.
        ``client.with_options(max_retries=8).jobs.create(spec)``. The copy shares the
        connection pool: closing either closes both."""
        copy = _base.with_limits(self, timeout, max_retries)
        copy.models, copy.datasets, copy.jobs = AsyncModels(copy), AsyncDatasets(copy), AsyncJobs(copy)
        return copy

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def healthz(self) -> Health:
        return await self._call(_base.health("/healthz"))

    async def readyz(self) -> Health:
        return await self._call(_base.health("/readyz"))

    async def _call(self, call: _base.Call[T], deadline: _base.Deadline | None = None) -> T:
        return _base.parse(call, await self._send(call, deadline), self.base_url)

    async def _send(self, call: _base.Call[Any], deadline: _base.Deadline | None = None
                    ) -> httpx.Response:
        """As :meth:`modelpress.Client._send`."""
        attempt = 0
        while True:
            response: httpx.Response | None = None
            timeout = _base.timeout_within(self._timeout, deadline)
            try:
                if call.upload is not None:
                    async with await anyio.open_file(call.upload, "rb") as fh:
                        # The size up front, as the sync client's file body sends it (httpx
                        # would stream an iterator chunked): the server can refuse an upload
                        # over its limit before reading it, and say how large it was.
                        size = os.fstat(fh.wrapped.fileno()).st_size
                        response = await self._http.request(
                            call.method, call.path, params=call.params,
                            headers={**call.headers, "Content-Length": str(size)},
                            content=_chunks(fh), timeout=timeout)
                else:
                    response = await self._http.request(call.method, call.path, params=call.params,
                                                        json=call.json, headers=dict(call.headers),
                                                        timeout=timeout)
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
                raise _base.bad_url(exc) from exc  # the same on every try: not retried
            except httpx.TransportError as exc:
                failure: Exception = exc
            else:
                if response.is_success or response.status_code in call.accept:
                    return response
                failure = status_error(response)
                if not _base.should_retry(response):
                    raise failure
            pause = _base.backoff_seconds(attempt, response)
            if deadline is not None and _base.out_of_time(deadline, attempt, self.max_retries,
                                                          pause):
                raise deadline.error() from failure
            if attempt >= self.max_retries:
                error = _base.gave_up(failure, call, self.base_url, self._url_hint, attempt + 1,
                                      self._timeout)
                raise error from (None if error is failure else failure)
            await anyio.sleep(pause)
            attempt += 1


async def _chunks(fh: Any, size: int = 1024 * 1024) -> AsyncIterator[bytes]:
    while chunk := await fh.read(size):
        yield chunk


class AsyncModels:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def upload(self, path: str | Path, name: str | None = None, format: str | None = None
                     ) -> ModelInfo:
        path = Path(path)
        if path.is_dir():
            with tempfile.TemporaryDirectory() as tmp:
                zipped = await anyio.to_thread.run_sync(_base.zip_folder, path, Path(tmp))
                name = name or _base.default_name(path.resolve().name)
                return await self._c._call(_base.upload_model(zipped, name, format or "hf"))
        return await self._c._call(_base.upload_model(path, name, format))

    async def list(self, *, limit: int = 100) -> list[ModelInfo]:
        """The newest ``limit`` uploads (at most 500), newest first; :meth:`iter` for all."""
        return (await self.page(limit=limit)).items

    async def page(self, *, limit: int = 100, cursor: str | None = None) -> ModelList:
        """One page, newest first: pass its ``next_cursor`` as ``cursor`` for the next."""
        return await self._c._call(_base.list_models(limit, cursor))

    async def iter(self) -> AsyncIterator[ModelInfo]:
        """Every upload, newest first, following the pages."""
        async for item in _base.every_item_async(lambda c: self.page(limit=500, cursor=c)):
            yield item

    async def get(self, model_id: str) -> ModelInfo:
        return await self._c._call(_base.get_model(model_id))

    async def delete(self, model_id: str) -> Deleted:
        """Delete an uploaded model; a queued or running job that names it is a ConflictError."""
        return await self._c._call(_base.delete_model(model_id))


class AsyncDatasets:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def upload(self, path: str | Path, name: str | None = None, format: str | None = None
                     ) -> DatasetInfo:
        return await self._c._call(_base.upload_dataset(Path(path), name, format))

    async def list(self, *, limit: int = 100) -> list[DatasetInfo]:
        """The newest ``limit`` uploads (at most 500), newest first; :meth:`iter` for all."""
        return (await self.page(limit=limit)).items

    async def page(self, *, limit: int = 100, cursor: str | None = None) -> DatasetList:
        """One page, newest first: pass its ``next_cursor`` as ``cursor`` for the next."""
        return await self._c._call(_base.list_datasets(limit, cursor))

    async def iter(self) -> AsyncIterator[DatasetInfo]:
        """Every upload, newest first, following the pages."""
        async for item in _base.every_item_async(lambda c: self.page(limit=500, cursor=c)):
            yield item

    async def get(self, dataset_id: str) -> DatasetInfo:
        return await self._c._call(_base.get_dataset(dataset_id))

    async def delete(self, dataset_id: str) -> Deleted:
        """Delete an uploaded dataset; a queued or running job that names it is a ConflictError."""
        return await self._c._call(_base.delete_dataset(dataset_id))


class AsyncJobs:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(self, spec: BaseModel | Mapping[str, Any], *, name: str | None = None,
                     idempotency_key: str | None = None) -> Job:
        return await self._c._call(_base.create_job(spec, name, idempotency_key))

    async def get(self, job_id: str) -> Job:
        return await self._c._call(_base.get_job(job_id))

    async def list(self, *, limit: int = 20, cursor: str | None = None, state: str | None = None,
                   kind: str | None = None) -> JobPage:
        return await self._c._call(_base.list_jobs(limit, cursor, state, kind))

    async def iter(self, *, state: str | None = None, kind: str | None = None
                   ) -> AsyncIterator[Job]:
        """Every job, newest first, following the pages."""
        async for job in _base.every_item_async(
                lambda c: self.list(limit=100, cursor=c, state=state, kind=kind)):
            yield job

    async def cancel(self, job_id: str, *, force: bool = False) -> Job:
        return await self._c._call(_base.cancel_job(job_id, force))

    async def delete(self, job_id: str) -> Deleted:
        """Delete a finished job with its artifacts and logs; a queued or running one is a
        ConflictError (cancel it first)."""
        return await self._c._call(_base.delete_job(job_id))

    async def log(self, job_id: str, *, tail: int = 500) -> builtins.list[str]:
        return await self._c._call(_base.job_log(job_id, tail))

    async def artifacts(self, job_id: str) -> builtins.list[ArtifactInfo]:
        return await self._c._call(_base.list_artifacts(job_id))

    async def events(self, job_id: str, *, last_event_id: str | None = None
                     ) -> AsyncIterator[JobEvent]:
        """Live events until the job ends; reconnects from the last event id if cut off, and
        rides out 429 and 5xx answers (a Redis restart) as other calls do."""
        async for event in self._events(job_id, last_event_id, None):
            yield event

    async def _events(self, job_id: str, last_event_id: str | None,
                      deadline: _base.Deadline | None) -> AsyncGenerator[JobEvent, None]:
        decoder = _base.SSEDecoder()
        decoder.last_id = last_event_id
        attempt = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if decoder.last_id:
                headers["Last-Event-ID"] = decoder.last_id
            timeout = _base.stream_timeout(self._c._timeout, deadline)
            try:
                async with self._c._http.stream("GET", _base.events_path(job_id), headers=headers,
                                                timeout=timeout) as resp:
                    if not resp.is_success:
                        await resp.aread()
                        if not _base.should_retry(resp) or attempt >= self._c.max_retries:
                            raise status_error(resp)
                        pause = _base.backoff_seconds(attempt, resp)
                    else:
                        _base.check_event_stream(resp, job_id, self._c.base_url)
                        decoder.new_stream()
                        async for line in resp.aiter_lines():
                            # A line (a keep-alive too): this connection worked, so a later
                            # cut (a proxy's time limit, an API restart) starts a new series of
                            # retries; a job that sits queued gets keep-alives only.
                            attempt = 0
                            try:
                                event = decoder.feed(line)
                            except ValueError as exc:  # not a job event: not this API
                                raise _base.unreadable(f"the event stream of {job_id}", resp,
                                                       self._c.base_url, exc) from exc
                            if event is not None:
                                yield event
                                if event.type == "state" and event.state in FINAL_STATES:
                                    return
                            if deadline is not None:
                                deadline.check()
                        # Closed without a final state event. A job that had already ended
                        # when we resumed after its last event has none left to send: ask.
                        if await self._ended(job_id, deadline):
                            return
                        # Else the server closed it early (restart, proxy timeout): reconnect
                        # from the last event id.
                        if attempt >= self._c.max_retries:
                            raise APIConnectionError(
                                f"event stream of {job_id} ended before the job did")
                        pause = _base.backoff_seconds(attempt, None)
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
                raise _base.bad_url(exc) from exc
            except httpx.TransportError as exc:
                if deadline is not None:
                    deadline.check()
                if attempt >= self._c.max_retries:
                    raise _base.transport_error(exc, f"the event stream of {job_id}") from exc
                pause = _base.backoff_seconds(attempt, None)
            await anyio.sleep(_base.pause_within(pause, deadline))
            if deadline is not None:
                deadline.check()
            attempt += 1

    async def _ended(self, job_id: str, deadline: _base.Deadline | None) -> bool:
        """Whether the job is in a final state, by one GET within the wait's deadline; False
        when that cannot be told now (the API restarting), so the caller reconnects as before.
        A 404 (deleted) is raised."""
        try:
            resp = await self._c._http.get(_base.get_job(job_id).path,
                                           timeout=_base.ended_probe_timeout(deadline))
        except httpx.TransportError:
            return False
        return _base.job_ended(resp, job_id, self._c.base_url)

    async def wait(self, job_id: str, *, progress: bool = False, timeout: float | None = None,
                   raise_on_failure: bool = True) -> Job:
        """As :meth:`modelpress.Client.jobs.wait`."""
        printer = ProgressPrinter(job_id) if progress else None
        deadline = _base.Deadline.after(job_id, timeout)
        events = self._events(job_id, None, deadline)
        try:
            async for event in events:
                if printer:
                    printer.show(event)
        finally:
            await events.aclose()
            if printer:
                printer.close()
        job = await self._c._call(_base.get_job(job_id), deadline and deadline.job_ended())
        if raise_on_failure and job.state in ("failed", "cancelled"):
            raise JobFailedError(job)
        return job

    async def download(self, job_id: str, name: str, dest: str | Path) -> Path:
        """As :meth:`modelpress.Client.jobs.download`."""
        path, tmp = _base.download_paths(dest, name)
        attempt = 0
        while True:
            try:
                with _base.cleaned_up(tmp, name, self._c.base_url, self._c._timeout):
                    async with self._c._http.stream("GET", _base.artifact_path(job_id, name),
                                                    timeout=self._c._timeout) as resp:
                        if not resp.is_success:
                            await resp.aread()
                            if not _base.should_retry(resp) or attempt >= self._c.max_retries:
                                raise status_error(resp)
                            pause = _base.backoff_seconds(attempt, resp)
                        else:
                            expected, digest = _base.etag_sha256(resp), hashlib.sha256()
                            async with await anyio.open_file(_base.part_file(tmp), "wb") as fh:
                                async for chunk in resp.aiter_bytes():
                                    digest.update(chunk)
                                    await fh.write(chunk)
                            return _base.finish_download(tmp, path, name, expected,
                                                         digest.hexdigest())
            except APIConnectionError:  # a timeout too; the .part is gone
                if attempt >= self._c.max_retries:
                    raise
                pause = _base.backoff_seconds(attempt, None)
            await anyio.sleep(pause)
            attempt += 1
