from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import StreamingResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import AfterValidator

from app import jobs, records
from app.deps import IDEMPOTENCY_KEY_PATTERN, DeleteKeyHeader, PrincipalDep, ServicesDep
from app.errors import ApiError
from app.schemas import ArtifactInfo, Deleted, Job, JobCreate, JobKind, JobLog, JobPage, JobState
from app.storage import StoreError, StoreUnavailable

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=201, response_model=Job,
             responses={200: {"model": Job, "description": "Already created with this key"}})
async def create_job(
    body: JobCreate,
    response: Response,
    svc: ServicesDep,
    who: PrincipalDep,
    idempotency_key: Annotated[
        str | None,
        Header(pattern=IDEMPOTENCY_KEY_PATTERN,
               description="Repeat a create safely: the same key returns the same job for 24 h."),
    ] = None,
) -> Job:
    """Validate a job spec, store the job record and queue it for a worker."""
    job, created = await jobs.create_job(svc, who.tenant, body, idempotency_key)
    if not created:
        response.status_code = 200
    return job


@router.get("", response_model=JobPage)
async def list_jobs(
    svc: ServicesDep,
    who: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,18}$")] = None,
    state: JobState | None = None,
    kind: JobKind | None = None,
) -> JobPage:
    """The caller's jobs, newest first."""
    return await jobs.list_jobs(svc, who.tenant, limit, cursor, state, kind)


@router.get("/{job_id}", response_model=Job)
async def get_job(job_id: str, svc: ServicesDep, who: PrincipalDep) -> Job:
    return await jobs.get_job(svc, who.tenant, job_id)


@router.delete("/{job_id}", response_model=Deleted)
async def delete_job(job_id: str, svc: ServicesDep, who: PrincipalDep,
                     idempotency_key: DeleteKeyHeader = None) -> Deleted:
    """Delete a finished job: its record, events, log and every stored artifact. A queued or
    running job is refused (409): cancel it first."""
    return await jobs.delete_job(svc, who.tenant, job_id, idempotency_key)


@router.post("/{job_id}/cancel", response_model=Job)
async def cancel_job(
    job_id: str,
    svc: ServicesDep,
    who: PrincipalDep,
    force: Annotated[bool, Query(description="Kill the worker process if it does not stop")] = False,
) -> Job:
    """Queued jobs are cancelled at once; running ones stop at the engine's next step, and
    one whose worker died (no heartbeat renews its lease) is closed at once."""
    return await jobs.cancel_job(svc, who.tenant, job_id, force)


async def _owned(job_id: str, svc: ServicesDep, who: PrincipalDep) -> None:
    """404 for another tenant's (or no) job, answered before a stream's 200 goes out."""
    await jobs.get_job(svc, who.tenant, job_id)


def _stream_id(value: str | None) -> str | None:
    """A Redis stream id is two 64-bit parts; a larger one would end the stream in an error
    after its 200 had been sent."""
    if value is not None and any(int(part) >= 2**64 for part in value.split("-")):
        raise ValueError("an event id is two numbers below 2**64 joined by '-', as the events "
                         "of this stream carry")
    return value


@router.get("/{job_id}/events", response_class=EventSourceResponse,
            dependencies=[Depends(_owned)])
async def job_events(
    job_id: str,
    svc: ServicesDep,
    who: PrincipalDep,
    last_event_id: Annotated[str | None, Header(pattern=r"^\d{1,20}-\d{1,20}$"),
                             AfterValidator(_stream_id)] = None,
) -> AsyncIterator[ServerSentEvent]:
    """Live state, progress and log events (Server-Sent Events), replayed from the start or from
    `Last-Event-ID`; the stream ends after the final state."""
    async for event in jobs.events(svc, who.tenant, job_id, last_event_id):
        yield event


@router.get("/{job_id}/log", response_model=JobLog)
async def job_log(
    job_id: str, svc: ServicesDep, who: PrincipalDep,
    tail: Annotated[int, Query(ge=1, le=10_000)] = 500,
) -> JobLog:
    return JobLog(job_id=job_id, lines=await jobs.log_lines(svc, who.tenant, job_id, tail))


@router.get("/{job_id}/artifacts", response_model=list[ArtifactInfo])
async def list_artifacts(job_id: str, svc: ServicesDep, who: PrincipalDep) -> list[ArtifactInfo]:
    return (await jobs.get_job(svc, who.tenant, job_id)).artifacts


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def download_artifact(
    job_id: str, name: str, svc: ServicesDep, who: PrincipalDep
) -> StreamingResponse:
    """Stream an artifact from the object store."""
    info = await jobs.artifact(svc, who.tenant, job_id, name)
    key = records.artifact_object(who.tenant, job_id, name)
    try:
        chunks = await svc.store.open_stream(key)
    except FileNotFoundError:
        raise ApiError(404, f"artifact {name!r} of job {job_id} is recorded but its file is gone "
                            "from the object store (removed outside modelpress); run the job "
                            "again to make it", "artifact_missing") from None
    except StoreUnavailable as exc:
        raise ApiError(503, f"could not read artifact {name!r}: {exc}; try again when the object "
                            "store answers") from None
    except StoreError as exc:
        raise ApiError(502, f"the object store refused to read artifact {name!r}: {exc}",
                       "store_refused") from None
    return StreamingResponse(
        chunks,
        media_type=info.media_type,
        headers={
            "Content-Length": str(info.size),
            "ETag": f'"{info.sha256}"',
            "Content-Disposition": f'attachment; filename="{name}"',
        },
    )
