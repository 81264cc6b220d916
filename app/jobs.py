"""Job records as the API sees them: create and enqueue, read, list, cancel, events and logs."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi.sse import ServerSentEvent
from pydantic import BaseModel
from redis.exceptions import RedisError, WatchError

from app import assets, records
from app.deps import Services
from app.errors import ApiError, not_found
from app.schemas import (
    FINAL_STATES,
    JOB_LIST_SCAN_LIMIT,
    LABELED_METRICS,
    UPLOAD_DATASETS,
    WAITING_FOR_WORKER,
    ArtifactInfo,
    BenchmarkSpec,
    DatasetInfo,
    DatasetRef,
    Deleted,
    ErrorInfo,
    IntrinsicDimensionSpec,
    Job,
    JobCreate,
    JobPage,
    MixedPrecisionSpec,
    ModelInfo,
    ModelRef,
    Progress,
    RunAttempt,
    unreadable_builtin,
)
from app.storage import StoreError

log = logging.getLogger("modelpress.api")
TASK_NAME = "modelpress.run_job"


def queue_for(svc: Services, spec: BaseModel) -> str:
    gpu = getattr(spec, "device", "auto") == "cuda" or getattr(spec, "backend", "") == "torch-cuda"
    return "gpu" if gpu else svc.settings.default_queue


async def served_queues(svc: Services) -> tuple[int, set[str] | None]:
    """(live workers, the queues they consume); None where a worker does not say which."""
    names = sorted(await svc.redis.smembers(records.WORKERS_KEY))
    raws = await svc.redis.mget([records.worker_key(n) for n in names]) if names else []
    dead = [n for n, raw in zip(names, raws, strict=True) if raw is None]
    if dead:  # names whose key expired; one that beat again meanwhile stays
        await svc.redis.eval(records.FORGET_DEAD_WORKERS, 1 + len(dead), records.WORKERS_KEY,
                             *(records.worker_key(n) for n in dead), *dead)
    queues: set[str] | None = set()
    for raw in (raw for raw in raws if raw is not None):
        try:
            named = json.loads(raw)["queues"]
        except (ValueError, KeyError, TypeError):
            named = None
        if named is None:  # an older worker's key: which queues it serves is unknown
            queues = None
        elif queues is not None:
            queues.update(named)
    return len(names) - len(dead), queues


async def _waiting_message(svc: Services, queue: str) -> str:
    _, queues = await served_queues(svc)
    if queues is None or queue in queues:
        return WAITING_FOR_WORKER
    how = ("`modelpress worker` on a machine with CUDA" if queue == "gpu" else
           f"`modelpress worker --queues {queue}`")
    return (f"{WAITING_FOR_WORKER} on the `{queue}` queue: none is running now (start one "
            f"with {how})")


def _refs(spec: BaseModel) -> list[tuple[assets.Collection, str]]:
    """The uploaded models and datasets a spec names."""
    out: list[tuple[assets.Collection, str]] = []
    for name in type(spec).model_fields:
        value = getattr(spec, name)
        for ref in value if isinstance(value, list) else [value]:
            if isinstance(ref, ModelRef) and ref.id:
                out.append(("models", ref.id))
            elif isinstance(ref, DatasetRef) and ref.id:
                out.append(("datasets", ref.id))
    return out


async def _check_refs(svc: Services, tenant: str, spec: BaseModel) -> None:
    """Every uploaded model or dataset a spec names must exist and belong to the caller; an
    uploaded model with a built-in dataset it cannot read is refused here, not in a worker."""
    records_of = {asset_id: await assets.require_asset(svc, collection, tenant, asset_id)
                  for collection, asset_id in _refs(spec)}  # (ids are unique across the two)
    model, dataset = getattr(spec, "model", None), getattr(spec, "dataset", None)
    if (isinstance(model, ModelRef) and model.id and isinstance(dataset, DatasetRef)
            and dataset.builtin):
        info = records_of[model.id]
        assert isinstance(info, ModelInfo)
        why = unreadable_builtin(f"an uploaded {info.format} model",
                                 UPLOAD_DATASETS[info.format], dataset.builtin)
        if why:
            raise ApiError(422, why)
    if isinstance(dataset, DatasetRef) and dataset.id:
        data = records_of[dataset.id]
        assert isinstance(data, DatasetInfo)
        _check_dataset(spec, data)


MIN_INTRINSIC_SAMPLES = 10  # 80% train, 20% test (workers/engine/intrinsic/job.py)


def _check_dataset(spec: BaseModel, info: DatasetInfo) -> None:
    """What a worker would refuse in an uploaded dataset the spec names, known from the tensors
    the upload recorded: labels (`y`, else `labels`) for a metric that scores them or for
    intrinsic dimension (which measures accuracy), enough samples to split, and a benchmark's
    batch."""
    if not info.tensors:
        return
    labeled = "y" in info.tensors or "labels" in info.tensors
    samples = next(iter(info.tensors.values())).shape[0]
    budget = getattr(spec, "budget", None)
    metric = getattr(budget, "metric", None) or getattr(spec, "metric", None)
    if metric in LABELED_METRICS and not labeled:
        raise ApiError(422, f"metric {metric} scores labels, but dataset {info.id} has none "
                            f"(its tensors: {', '.join(info.tensors)}): upload it with integer "
                            "labels under `y`, or give metric cosine or mse (they compare with "
                            "the float model's outputs)")
    if isinstance(spec, BenchmarkSpec) and samples < spec.batch_size:
        raise ApiError(422, f"dataset {info.id} has {samples} samples, fewer than batch_size "
                            f"{spec.batch_size}: give batch_size {samples} or less, or upload "
                            "more samples")
    if isinstance(spec, IntrinsicDimensionSpec):
        if not labeled:
            raise ApiError(422, f"intrinsic_dimension measures accuracy: dataset {info.id} "
                                "needs labels (integer class indices under `y`); its tensors: "
                                f"{', '.join(info.tensors)}")
        if samples < MIN_INTRINSIC_SAMPLES:
            raise ApiError(422, f"dataset {info.id} has {samples} samples; intrinsic_dimension "
                                f"needs at least {MIN_INTRINSIC_SAMPLES} (the first 80% train, "
                                "the last 20% measure accuracy)")


def _check_spec(spec: BaseModel) -> None:
    """What the schema cannot refuse alone, as it holds for a built-in model only: onnxruntime's
    default levels for a model with convolutions (digits-cnn) start with int8-static, which
    LoRA recovery cannot take (a worker refused it after loading the model)."""
    if (isinstance(spec, MixedPrecisionSpec) and spec.lora is not None and spec.levels is None
            and spec.backend == "onnxruntime-cpu" and spec.model.zoo == "digits-cnn"):
        raise ApiError(422, "LoRA recovery needs dynamic levels, and onnxruntime-cpu's default "
                            "levels for digits-cnn (convolutions) start with int8-static, whose "
                            "grids are calibrated on the weights the adapters change: give "
                            'levels such as ["int8", "int4"]')


async def create_job(
    svc: Services, tenant: str, body: JobCreate, idempotency_key: str | None = None
) -> tuple[Job, bool]:
    """Returns the job and whether it was created now (False: an earlier call with the same
    Idempotency-Key already created it)."""
    spec = body.spec
    job_id = f"job_{uuid.uuid4().hex}"
    idem = None
    if idempotency_key:
        idem = records.idempotency_key(tenant, idempotency_key)
        # a key freed between the two calls (its job deleted) is taken again
        while not await svc.redis.set(idem, job_id, nx=True, ex=records.IDEMPOTENCY_TTL_S):
            existing = await svc.redis.get(idem)
            if existing == job_id:  # our own SET, retried by the client after a lost reply
                break
            if existing is None:
                continue
            try:
                earlier = await get_job(svc, tenant, str(existing))
            except ApiError as exc:
                if exc.status != 404:
                    raise
                # The try that set the key has not written its job: it is slow (and this is
                # its client's retry), or it died, or it failed and could not free the key
                # (Redis was away). This try takes the key over, only while that job is still
                # unwritten; the other one then writes nothing (``_write_job`` watches the key).
                if await svc.redis.eval(records.TAKE_OVER_IDEM, 2, idem,
                                        records.job_key(str(existing)), str(existing), job_id,
                                        records.IDEMPOTENCY_TTL_S):
                    break
                continue
            if (earlier.spec.model_dump(mode="json"), earlier.name) != (
                    spec.model_dump(mode="json"), body.name):
                raise ApiError(422, f"this Idempotency-Key already made job {earlier.id} from "
                                    "another spec or name; a retry must send the same request, "
                                    "and a new job needs a new key", "idempotency_key_reused")
            return earlier, False
    queue = queue_for(svc, spec)
    job = Job(
        id=job_id, kind=spec.kind, name=body.name, state="queued", spec=spec, queue=queue,
        created_at=records.now(),
        progress=Progress(stage="queued", message=await _waiting_message(svc, queue),
                          updated_at=records.now()),
    )
    try:
        # Checked once the key is held, not before it is looked up: a retry answers with its job
        # although a check would refuse it now (its upload deleted since the job ended, or a
        # check added by a release since the first try); a first try is checked in full.
        _check_spec(spec)
        await _check_refs(svc, tenant, spec)
        seq = int(await svc.redis.incr(records.tenant_seq_key(tenant)))
        await _write_job(svc, tenant, job, seq, idem)
    except BaseException:
        if idem is not None:  # no job was written: the key must not name one for 24 h
            with contextlib.suppress(Exception):
                await svc.redis.eval(records.DEL_IF_EQUALS, 1, idem, job_id)
        raise
    try:
        await send(svc, job_id, queue)
    except Exception as exc:  # the record stays, failed with the reason, so nothing is silently lost
        log.exception("could not enqueue %s", job_id)
        err = ErrorInfo(type="enqueue_failed", message=f"could not reach the queue: {exc}")
        progress = Progress(stage="failed", message=err.message, updated_at=records.now())
        event = records.event_json(job_id, "state", state="failed", message=err.message)
        await svc.redis.eval(
            records.FAIL_UNSENT, 4, records.job_key(job_id), records.events_key(job_id),
            records.FINISHED_KEY, records.UNSENT_KEY, records.iso(), err.model_dump_json(),
            progress.model_dump_json(), event, svc.settings.event_stream_maxlen, job_id,
            time.time())
        if idem is not None:  # a retry with the same key makes a new job, not this failed one
            await svc.redis.eval(records.DEL_IF_EQUALS, 1, idem, job_id)
        raise ApiError(503, "the job queue is unavailable; try again shortly") from exc
    return job, True


async def send(svc: Services, job_id: str, queue: str) -> None:
    """Hands the job to the queue, then takes it off the unsent list."""
    await anyio.to_thread.run_sync(
        lambda: svc.celery.send_task(TASK_NAME, args=[job_id], queue=queue, task_id=job_id))
    try:
        await svc.redis.zrem(records.UNSENT_KEY, job_id)
    except RedisError:  # queued all the same; app.unsent may send it twice (a repeat is dropped)
        log.warning("job %s is queued but still listed as unsent", job_id, exc_info=True)


async def _write_job(svc: Services, tenant: str, job: Job, seq: int, idem: str | None) -> None:
    """The job's record, index entry and first event, written only while every upload it names
    still exists: its records are watched from the check on, so a delete that takes one before
    the write fails the write (the check then answers 404), and one that takes it after finds
    the job live (409). Without this, a job could name an upload deleted in between. So is the
    Idempotency-Key, written only while it names this job (a retry may have taken it over)."""
    refs = [records.asset_key(c, i) for c, i in _refs(job.spec)]
    for _ in range(10):
        async with svc.redis.pipeline(transaction=True) as pipe:
            if refs or idem:
                await pipe.watch(*refs, *([idem] if idem else []))
                if idem and await svc.redis.get(idem) != job.id:
                    raise ApiError(409, "a later request with this Idempotency-Key took it over "
                                        "(this one was slow, and was retried); that request "
                                        "answers with the job: repeat this one to get it")
                await _check_refs(svc, tenant, job.spec)
                pipe.multi()
            pipe.hset(records.job_key(job.id), mapping=records.job_to_hash(job, tenant, seq, idem))
            pipe.zadd(records.tenant_jobs_key(tenant), {job.id: seq})
            pipe.zadd(records.UNSENT_KEY, {job.id: time.time()})  # until the queue has it
            pipe.xadd(records.events_key(job.id),
                      {"data": records.event_json(job.id, "state", state="queued")},
                      maxlen=svc.settings.event_stream_maxlen, approximate=True)
            try:
                await pipe.execute()
                return
            except WatchError:  # an upload it names changed meanwhile: check again
                continue
    raise ApiError(503, "the job's inputs kept changing while it was being created; try again")


async def _raw(svc: Services, tenant: str, job_id: str) -> dict[str, str]:
    h: dict[str, str] = await svc.redis.hgetall(records.job_key(job_id))
    if not h or h.get("tenant") != tenant:
        raise not_found("job", job_id)
    return h


async def get_job(svc: Services, tenant: str, job_id: str) -> Job:
    h = await _raw(svc, tenant, job_id)
    pipe = svc.redis.pipeline(transaction=False)
    pipe.hgetall(records.artifacts_key(job_id))
    pipe.hgetall(records.runs_key(job_id))
    artifacts, runs = await pipe.execute()
    return records.job_from_hash(h, artifacts, runs)


async def list_jobs(
    svc: Services, tenant: str, limit: int, cursor: str | None, state: str | None, kind: str | None
) -> JobPage:
    """Up to ``limit`` of the caller's jobs that match ``state`` and ``kind``, newest first. The
    index is filtered as it is read, so a page fills past jobs that do not match; it stops at
    one more match (another page follows: a cursor), at the index's end (no cursor), or after
    JOB_LIST_SCAN_LIMIT entries (``partial``: a cursor to resume from, although the page may
    be short, even empty). The cursor is the sequence number of the last entry this page
    accounted for (returned, not matching, or deleted meanwhile): the next page reads on from
    there."""
    key = records.tenant_jobs_key(tenant)
    top: Any = f"({int(cursor)}" if cursor else "+inf"
    items: list[Job] = []
    last_seq: int | None = None
    scanned = 0
    want = limit + 1  # unfiltered, one entry past the page says whether another follows
    while scanned < JOB_LIST_SCAN_LIMIT:
        batch = await svc.redis.zrevrangebyscore(
            key, top, "-inf", start=0, num=min(want, JOB_LIST_SCAN_LIMIT - scanned),
            withscores=True)
        if not batch:
            return JobPage(items=items)
        scanned += len(batch)
        want *= 2  # filtered: fewer round trips past jobs that do not match
        top = f"({int(batch[-1][1])}"
        pipe = svc.redis.pipeline(transaction=False)
        for job_id, _ in batch:
            pipe.hmget(records.job_key(job_id), ["tenant", "state", "kind"])
        for (job_id, score), (owner, st, kd) in zip(batch, await pipe.execute(), strict=True):
            # another state or kind, or a job deleted since the index was read, is passed over
            if owner == tenant and (not state or st == state) and (not kind or kd == kind):
                if len(items) == limit:  # a match past a full page: another page follows
                    return JobPage(items=items, next_cursor=str(last_seq))
                with contextlib.suppress(ApiError):  # deleted since its fields were read
                    items.append(await get_job(svc, tenant, job_id))
            last_seq = int(score)
    # the bound: go on from here only if the index holds older entries
    more = last_seq is not None and bool(await svc.redis.zcount(key, "-inf", f"({last_seq}"))
    return JobPage(items=items, next_cursor=str(last_seq) if more else None,
                   partial=more and len(items) < limit)


async def cancel_job(svc: Services, tenant: str, job_id: str, force: bool) -> Job:
    await _raw(svc, tenant, job_id)  # 404 unless it is the caller's
    maxlen = svc.settings.event_stream_maxlen
    event = records.event_json(job_id, "state", state="cancelled")
    outcome = await svc.redis.eval(
        records.CANCEL, 3, records.job_key(job_id), records.events_key(job_id),
        records.FINISHED_KEY, records.iso(), event, maxlen, job_id, time.time(),
        Progress(stage="cancelled", message="cancelled before it started",
                 updated_at=records.now()).model_dump_json(),
    )
    if outcome in FINAL_STATES and outcome != "cancelled":
        raise ApiError(409, f"job {job_id} already {outcome}; nothing to cancel")
    # Revoke is the fallback: a queued message is discarded when a worker receives it; with
    # force, the worker process running it is killed and the job is closed here.
    terminate = force and outcome == "requested"
    await anyio.to_thread.run_sync(
        lambda: svc.celery.control.revoke(job_id, terminate=terminate, signal="SIGKILL")
    )
    if terminate:
        await _close_cancelled(svc, job_id, event, "cancelled by force; the worker was stopped",
                               run_outcome="cancelled")
    elif outcome == "requested":
        # The attempt is read before the lease: a delivery that claims the job later holds the
        # lease first (so it is seen here) or bumps the attempt after (so FINISH refuses ours).
        attempt = await svc.redis.hget(records.job_key(job_id), "attempts") or "0"
        if not await svc.redis.exists(records.lease_key(job_id)):
            # No heartbeat renews the lease: the worker running it died. Nothing would read the
            # flag until the queue redelivers the job, so close it now (that delivery is dropped).
            await _close_cancelled(
                svc, job_id, event, "cancelled; its worker sent no heartbeat for the lease's "
                "lifetime (three heartbeats: it stopped or stalled), so the job was closed at "
                "once", run_outcome="lost", attempt=attempt)
    return await get_job(svc, tenant, job_id)


async def _close_cancelled(svc: Services, job_id: str, event: str, message: str,
                           run_outcome: str, attempt: str | None = None) -> None:
    """Closes a running job as cancelled for an attempt that cannot: one killed by force, or one
    whose worker died. FINISH accepts only the current attempt, so one that started since
    ``attempt`` was read goes on and cancels itself at its first progress (the flag is set)."""
    err = ErrorInfo(type="cancelled", message=message)
    if attempt is None:
        attempt = await svc.redis.hget(records.job_key(job_id), "attempts") or "0"
    closed = await svc.redis.eval(
        records.FINISH, 3, records.job_key(job_id), records.events_key(job_id),
        records.FINISHED_KEY, attempt, "cancelled", records.iso(), event,
        svc.settings.event_stream_maxlen, "", err.model_dump_json(), job_id, time.time(),
    )
    # the attempt cannot record how its run ended: the API does (if it closed the job)
    raw = await svc.redis.hget(records.runs_key(job_id), attempt) if int(closed) else None
    if raw is not None:
        run = RunAttempt.model_validate_json(raw)
        if run.outcome == "running":
            await svc.redis.eval(records.HSET_IF_JOB, 2, records.job_key(job_id),
                                 records.runs_key(job_id), attempt, run.model_copy(
                update={"outcome": run_outcome, "finished_at": records.now()}
            ).model_dump_json(), attempt)


async def delete_job(svc: Services, tenant: str, job_id: str,
                     idempotency_key: str | None = None) -> Deleted:
    """A finished job's record, events, log, memo and every stored file (artifacts and attempt
    logs). The files go first: if the store cannot be reached, the record stays whole enough to
    find them and a repeated DELETE finishes the work. With an Idempotency-Key, the answer is
    kept (24 h) in the same step that removes the record, for a retry whose reply was lost."""
    target = f"job {job_id}"
    replay_id, ttl = assets.delete_key(idempotency_key)
    replay = records.delete_replay_key(tenant, replay_id)
    if idempotency_key and (earlier := await assets.read_delete_replay(svc, replay, target)):
        return Deleted.model_validate(earlier["answer"])
    h = await _raw(svc, tenant, job_id)
    if h.get("state") not in FINAL_STATES:
        raise ApiError(409, f"job {job_id} is {h.get('state')}; cancel it first (POST "
                            f"/v1/jobs/{job_id}/cancel, or `modelpress jobs cancel {job_id}`), "
                            "then delete it")
    prefix = records.artifact_object(tenant, job_id, "")
    removed = await assets.delete_files(svc, prefix, target)
    answer = Deleted(id=job_id, object="job", files_removed=removed)
    outcome = await svc.redis.eval(
        records.DELETE_JOB, 4 + len(records.job_keys(job_id)),
        # a job created without a key passes one no request can name
        records.tenant_jobs_key(tenant), h.get("idem") or records.idempotency_key(tenant, ""),
        records.FINISHED_KEY, replay, *records.job_keys(job_id), tenant, job_id,
        assets.replay_json(target, answer), ttl,
    )
    if outcome in ("missing", "replayed"):
        # deleted by a concurrent call, or by a try with this key (or by this very script,
        # re-sent by the Redis client after a lost reply): then its answer
        if earlier := await assets.read_delete_replay(svc, replay, target):
            return Deleted.model_validate(earlier["answer"])
        raise not_found("job", job_id)
    if outcome != "deleted":
        raise ApiError(409, f"job {job_id} is {outcome}; cancel it first")
    # A stale attempt that stored an artifact while the first sweep was listing got its record
    # in before the keys went; from now on such a writer finds no job and deletes its own file.
    # Best effort: the job's record is gone, so a failure here is logged, not answered.
    try:
        late = await svc.store.delete_prefix_async(prefix)
    except StoreError as exc:
        log.warning("could not sweep %s again after its delete: %s", target, exc)
        late = 0
    if late:
        answer = answer.model_copy(update={"files_removed": removed + late})
        with contextlib.suppress(Exception):  # the delete is done; the replay only counts less
            await svc.redis.set(replay, assets.replay_json(target, answer), xx=True, keepttl=True)
    return answer


async def events(
    svc: Services, tenant: str, job_id: str, last_event_id: str | None
) -> AsyncIterator[ServerSentEvent]:
    await _raw(svc, tenant, job_id)
    key = records.events_key(job_id)
    last = last_event_id or "0-0"
    while True:
        # FINISH writes the final state and its event in one step: a final job's stream holds
        # all it ever will, so it is read without blocking (a resume after the end ends at once)
        final = await svc.redis.hget(records.job_key(job_id), "state") in FINAL_STATES
        resp = await svc.redis.xread({key: last}, count=200, block=None if final else 10_000)
        if not resp:
            if final or await svc.redis.hget(records.job_key(job_id), "state") in FINAL_STATES:
                return
            yield ServerSentEvent(comment="keep-alive")
            continue
        for entry_id, fields in resp[0][1]:
            last = entry_id
            ev = records.event_from_stream(entry_id, fields)
            yield ServerSentEvent(data=ev.model_dump(mode="json"), event=ev.type, id=entry_id)
            if ev.type == "state" and ev.state in FINAL_STATES:
                return


async def log_lines(svc: Services, tenant: str, job_id: str, tail: int) -> list[str]:
    await _raw(svc, tenant, job_id)
    lines: list[str] = await svc.redis.lrange(records.log_key(job_id), -tail, -1)
    return lines


async def artifact(svc: Services, tenant: str, job_id: str, name: str) -> ArtifactInfo:
    await _raw(svc, tenant, job_id)
    raw = await svc.redis.hget(records.artifacts_key(job_id), name)
    if raw is None:
        raise not_found("artifact", name)
    return ArtifactInfo.model_validate(json.loads(raw))
