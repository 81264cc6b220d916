"""Runs one job attempt: claim it, run the engine with a live context, record the outcome.

Idempotent per job id: a delivery of a finished job is dropped, a duplicate delivery while a
live worker holds the job's lease is dropped, and only the attempt that claimed the job may
finish it. A worker that dies mid-job leaves its attempt marked ``lost`` by the next one.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel, TypeAdapter

from app import records
from app.config import Settings, get_settings
from app.redis_client import sync_client
from app.schemas import FINAL_STATES, ArtifactInfo, ErrorInfo, JobSpec, Progress, RunAttempt
from app.storage import Store, StoreError, StoreUnavailable, open_store
from workers.engine.context import JobCancelled, Throttle, UserError
from workers.heartbeat import RELEASE_IF_HELD, RENEW_IF_HELD, Beat, Lease

log = logging.getLogger("modelpress.worker")
ITEM_TASK = "modelpress.run_item"
_spec_adapter: TypeAdapter[Any] = TypeAdapter(JobSpec)


@lru_cache(maxsize=1)
def _services() -> tuple[Settings, redis.Redis, Store]:
    settings = get_settings()
    return settings, sync_client(settings, health_check_interval=30), open_store(settings, retry=True)


class ArtifactTooLarge(UserError):
    type = "artifact_too_large"


ATTEMPT_LOG_LINES_PER_KEPT = 10  # the artifact keeps 10x the lines Redis keeps (50,000)


class _RedisLogHandler(logging.Handler):
    """Mirrors engine log records into the job's capped Redis log and its event stream, and
    keeps the attempt's log for its artifact: all of it up to ``keep`` lines, else the first
    and the last ``keep // 2`` (a job that logs without end would fill the worker's memory)."""

    def __init__(self, ctx: WorkerContext, keep: int) -> None:
        super().__init__(logging.INFO)
        self.ctx = ctx
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self._head: list[str] = []
        self._tail: collections.deque[str] = collections.deque(maxlen=keep - keep // 2)
        self._head_max = keep // 2
        self._seen = 0

    @property
    def lines(self) -> list[str]:
        left_out = self._seen - len(self._head) - len(self._tail)
        gap = [f"... {left_out} lines left out (the first {len(self._head)} and the last "
               f"{len(self._tail)} are kept) ..."] if left_out else []
        return [*self._head, *gap, *self._tail]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            self._seen += 1
            (self._head.append if len(self._head) < self._head_max else self._tail.append)(line)
            self.ctx.append_log(line)
        except Exception:
            self.handleError(record)


class WorkerContext:
    def __init__(self, job_id: str, tenant: str, attempt: int, settings: Settings,
                 r: redis.Redis, store: Store, workdir: Path, queue: str = "cpu",
                 who: str = "worker") -> None:
        self.job_id = job_id
        self.queue = queue
        self.who = who
        self._tenant = tenant
        self.attempt = attempt
        self.settings = settings
        self.r = r
        self._store = store
        self._workdir = workdir
        self.log = logging.getLogger(f"modelpress.job.{job_id}")
        self._throttle = Throttle(0.25)
        self._last_stage = ""

    @property
    def store(self) -> Store:
        return self._store

    @property
    def tenant(self) -> str:
        return self._tenant

    @property
    def workdir(self) -> Path:
        return self._workdir

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        if stage == self._last_stage and fraction < 1.0 and not self._throttle.ready():
            self.check_cancelled()
            return
        self._last_stage = stage
        p = Progress(stage=stage, fraction=fraction, message=message, updated_at=records.now())
        _written, cancel = self.r.eval(
            records.PROGRESS, 2, records.job_key(self.job_id), records.events_key(self.job_id),
            str(self.attempt), p.model_dump_json(),
            records.event_json(self.job_id, "progress", progress=p),
            self.settings.event_stream_maxlen,
        )
        if int(cancel):
            raise JobCancelled()

    def check_cancelled(self) -> None:
        h = self.r.hmget(records.job_key(self.job_id), ["cancel_requested", "state", "attempts"])
        flag, state, attempts = h
        if flag == "1" or state != "running" or attempts != str(self.attempt):
            raise JobCancelled()

    def append_log(self, line: str) -> None:
        _append_log(self.r, self.settings, self.job_id, self.attempt, line)

    def save_artifact(self, name: str, data: bytes | Path, media_type: str) -> ArtifactInfo:
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        limit = self.settings.max_artifact_bytes
        if size > limit:
            raise ArtifactTooLarge(f"artifact {name} is {size} bytes, over the limit of {limit} "
                                   "bytes (MODELPRESS_MAX_ARTIFACT_BYTES); nothing was stored")
        return self._store_artifact(name, data, media_type)

    def _store_artifact(self, name: str, data: bytes | Path, media_type: str,
                        retry: bool = True) -> ArtifactInfo:
        """The object first, then its record: a failed write leaves no artifact behind, and
        neither does one that finds the job deleted meanwhile."""
        if "/" in name or name.startswith(".") or not name:
            raise ValueError(f"bad artifact name {name!r}")
        key = records.artifact_object(self._tenant, self.job_id, name)
        if self.r.hget(records.job_key(self.job_id), "attempts") != str(self.attempt):
            # replaced by a later attempt: the object's key is shared, so not even written
            raise JobCancelled()
        stored = (self._store.put_file(key, data) if isinstance(data, Path)
                  else self._store.put_bytes(key, data, retry))
        info = ArtifactInfo(name=name, size=stored.size, sha256=stored.sha256,
                            media_type=media_type, created_at=records.now())
        if not records.hset_if_job(self.r, self.job_id, records.artifacts_key(self.job_id), name,
                                   info.model_dump_json(), self.attempt):
            self._store.delete(key)
            raise JobCancelled()  # deleted (or replaced): nobody reads what this attempt makes
        return info

    def memo_get(self, key: str) -> Any | None:
        raw = self.r.hget(records.memo_key(self.job_id), key)
        return None if raw is None else json.loads(raw)

    def memo_put(self, key: str, value: Any) -> None:
        if not records.hset_if_job(self.r, self.job_id, records.memo_key(self.job_id), key,
                                   json.dumps(value)):
            raise JobCancelled()

    @contextmanager
    def claim(self, key: str) -> Iterator[bool]:
        """A Redis key held with a TTL and renewed while the piece is computed: a worker that
        dies lets it expire within ``worker_heartbeat_s * 3`` seconds."""
        name = f"{records.memo_key(self.job_id)}:claim:{key}"
        token = f"{self.who}:{uuid.uuid4().hex[:8]}"
        ttl = max(3, int(self.settings.worker_heartbeat_s * 3))
        if not self.r.set(name, token, nx=True, ex=ttl):
            yield False
            return
        beat = Beat(ttl / 3, lambda: self.r.eval(RENEW_IF_HELD, 1, name, token, ttl)).start()
        try:
            yield True
        finally:
            beat.stop()
            self.r.eval(RELEASE_IF_HELD, 1, name, token)

    def fan_out(self, items: list[dict[str, Any]]) -> int:
        """One Celery group of pieces on this job's queue; nobody waits on the group itself
        (pieces report through the memo), so no result backend is needed."""
        from celery import group

        from workers.celery_app import celery_app

        if items:
            group(celery_app.signature(ITEM_TASK, args=[self.job_id, self.attempt, item],
                                       queue=self.queue, immutable=True)
                  for item in items).apply_async()
        return len(items)


def _append_log(r: redis.Redis, settings: Settings, job_id: str, attempt: int, line: str) -> None:
    """A line for the job's capped log and its event stream, while ``attempt`` is its latest."""
    r.eval(records.LOG_IF_JOB, 3, records.job_key(job_id), records.log_key(job_id),
           records.events_key(job_id), line, settings.log_lines_kept,
           records.event_json(job_id, "log", message=line), settings.event_stream_maxlen,
           str(attempt))


def _finish(r: redis.Redis, settings: Settings, job_id: str, run: RunAttempt, outcome: str,
            result: str | None, error: ErrorInfo | None) -> bool:
    """Ends the attempt ``run``: its run's outcome, then the job's final state (only while that
    attempt holds the job). Whether the job was closed by this call."""
    # The run's outcome is written before the job's final state, so whoever sees the job
    # final also sees how its run ended (written after, a reader could see 'running').
    _record_run(r, job_id, run.model_copy(update={"outcome": outcome,
                                                  "finished_at": records.now()}))
    # The memo only serves re-runs of an unfinished job; kept a day after the end for
    # inspection, then Redis drops it.
    r.expire(records.memo_key(job_id), MEMO_KEEP_S)
    return bool(int(r.eval(
        records.FINISH, 3, records.job_key(job_id), records.events_key(job_id),
        records.FINISHED_KEY, str(run.attempt), outcome, records.iso(),
        records.event_json(job_id, "state", state=outcome), settings.event_stream_maxlen,
        result or "", error.model_dump_json() if error else "", job_id, time.time())))


def _record_run(r: redis.Redis, job_id: str, run: RunAttempt, by: int | None = None) -> None:
    """Written only while attempt ``by`` (default: the run's own) is the job's latest: an
    attempt that was replaced, having stalled past its lease, leaves its run marked lost."""
    records.hset_if_job(r, job_id, records.runs_key(job_id), str(run.attempt),
                        run.model_dump_json(), run.attempt if by is None else by)


def _mark_lost_runs(r: redis.Redis, job_id: str, attempt: int) -> None:
    for raw in r.hgetall(records.runs_key(job_id)).values():
        run = RunAttempt.model_validate_json(raw)
        if run.attempt < attempt and run.outcome == "running":
            _record_run(r, job_id, run.model_copy(update={"outcome": "lost",
                                                          "finished_at": records.now()}), attempt)


def execute(job_id: str, worker: str) -> None:
    settings, r, store = _services()
    h: dict[str, str] = r.hgetall(records.job_key(job_id))
    if not h:
        log.warning("no record for job %s; dropping the message", job_id)
        return
    if h.get("state") in FINAL_STATES:
        log.info("job %s is already %s; dropping a repeated delivery", job_id, h["state"])
        return
    holder = f"{worker}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    lease = Lease(r, job_id, holder, settings.worker_heartbeat_s)
    if not lease.acquire() and not _outlive(job_id, lease, worker, settings.worker_heartbeat_s):
        log.info("job %s is held by %s; dropping a duplicate delivery", job_id,
                 lease.current_holder())
        return
    try:
        _run_claimed(job_id, worker, h, settings, r, store, lease)
    finally:
        lease.release()


def _outlive(job_id: str, lease: Lease, worker: str, heartbeat_s: float) -> bool:
    """Whether the job's lease, held by someone else, could be taken after all: at once when its
    holder is a process of this worker that is gone, else by waiting one lease lifetime for
    it to expire. Acknowledging this delivery while the holder is dead would lose the job: Celery
    re-delivers a job whose pool process was killed (the OOM killer, say) at once, seconds
    before the dead process's lease runs out, and that message is the only one left."""
    held = lease.current_holder()
    if held is not None:
        node, _, rest = held.partition(":")
        pid = rest.split(":", 1)[0]
        if node == worker and pid.isdigit() and not _alive(int(pid)) and lease.take_over(held):
            log.info("job %s was held by %s, a process of this worker that is gone; taking it",
                     job_id, held)
            return True
    deadline = time.monotonic() + lease.ttl + heartbeat_s
    while time.monotonic() < deadline:  # a live holder renews it every heartbeat
        time.sleep(min(1.0, heartbeat_s))
        if lease.acquire():
            log.info("the lease of job %s expired (its holder %s is gone); taking it", job_id, held)
            return True
    return False


# '+' ends the host name (host names never hold one), so no host's prefix starts another's
SCRATCH_PREFIX = f"modelpress+{socket.gethostname()}+"


@contextmanager
def scratch(what: str) -> Iterator[Path]:
    """A work folder in the system's temp folder, named with this host and process: a task
    killed by a forced cancel or its hard time limit skips the cleanup, so each new one first
    removes the folders of this host's processes that are gone. (Libraries' own temp files, such
    as ORT's quantizer scratch for the seconds it runs, are not redirected here: some cache
    paths under the temp folder for the life of the process.)"""
    sweep_scratch()
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}+{what}-") as tmp:
        yield Path(tmp)


def sweep_scratch() -> int:
    """Removes the work folders of this host's dead processes; how many."""
    removed = 0
    for folder in Path(tempfile.gettempdir()).glob(f"{glob.escape(SCRATCH_PREFIX)}*"):
        pid = folder.name[len(SCRATCH_PREFIX):].split("+", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed += not folder.exists()
    if removed:
        log.info("removed %d work folders of killed tasks", removed)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or no pid at all
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _run_claimed(job_id: str, worker: str, h: dict[str, str], settings: Settings,
                 r: redis.Redis, store: Store, lease: Lease) -> None:
    from workers.engine import registry  # imports torch; keep it out of the API's import path

    state, attempt = r.eval(records.START, 3, records.job_key(job_id), records.events_key(job_id),
                            records.RUNNING_KEY, records.iso(),
                            records.event_json(job_id, "state", state="running"),
                            settings.event_stream_maxlen, time.time(), job_id)
    if state != "running":
        log.info("job %s is %s; not starting it", job_id, state)
        return
    attempt = int(attempt)
    lease.start(attempt)
    _mark_lost_runs(r, job_id, attempt)
    run = RunAttempt(attempt=attempt, worker=worker, started_at=records.now())
    _record_run(r, job_id, run)

    tenant = h["tenant"]
    with ExitStack() as cleanup:
        try:
            tmp = cleanup.enter_context(scratch(job_id))
        except OSError as exc:  # a full or missing temp folder: failing here left it 'running'
            no_folder = ErrorInfo(type="worker_error", message=(
                f"worker {worker} could not create the job's work folder under "
                f"{tempfile.gettempdir()} ({exc.strerror or exc}): free space there, or point "
                "TMPDIR at a writable folder with room and restart the worker; then submit the "
                "job again"))
            line = f"{records.iso()} ERROR {no_folder.message}"
            log.error("job %s: %s", job_id, no_folder.message)
            ctx = WorkerContext(job_id, tenant, attempt, settings, r, store,
                                Path(tempfile.gettempdir()), who=worker)  # no engine: unused
            ctx.append_log(line)
            _close_attempt(ctx, run, [line], "failed", None, no_folder)
            return
        ctx = WorkerContext(job_id, tenant, attempt, settings, r, store, tmp,
                            queue=h.get("queue") or settings.default_queue, who=worker)
        handler = _RedisLogHandler(ctx, keep=ATTEMPT_LOG_LINES_PER_KEPT * settings.log_lines_kept)
        engine_log = logging.getLogger("modelpress")
        engine_log.addHandler(handler)
        engine_log.setLevel(logging.INFO)
        outcome, result, error = "failed", None, None
        try:
            ctx.log.info("attempt %d on %s", attempt, worker)
            if attempt > 1:
                ctx.log.warning("retrying: an earlier attempt did not finish (its worker "
                                "stopped or died)")
                # the lost attempt's last stage would otherwise show until the engine reports
                ctx.progress("retry", 0.0, f"attempt {attempt} on {worker}: an earlier "
                             "attempt did not finish (its worker stopped or died)")
            if h.get("cancel_requested") == "1":
                raise JobCancelled()
            spec = _spec_adapter.validate_json(h["spec"])
            out: BaseModel = registry.run(spec, ctx)
            result, outcome = out.model_dump_json(), "succeeded"
            ctx.log.info("succeeded")
        except JobCancelled:
            outcome = "cancelled"
            error = ErrorInfo(type="cancelled", message="cancelled by the user")
            ctx.log.info("cancelled")
        except SoftTimeLimitExceeded:
            error = ErrorInfo(type="time_limit", message=f"the job ran past its time limit of "
                              f"{settings.task_time_limit_s} s and was stopped")
            ctx.log.error(error.message)
        except (UserError, StoreError) as exc:
            error = ErrorInfo(type=exc.type, message=str(exc))
            ctx.log.error("failed: %s", exc)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            error = ErrorInfo(type="redis_unavailable", message=(
                f"the worker could not reach Redis for over {settings.redis_retry_s:g} s "
                f"(MODELPRESS_REDIS_RETRY_S) while running the job ({exc}); submit it again "
                "once Redis answers steadily"))
            ctx.log.error("failed: %s", error.message)
        except Exception as exc:
            error = ErrorInfo(type=type(exc).__name__, message=str(exc) or repr(exc))
            ctx.log.error("failed: %s\n%s", exc, traceback.format_exc())
        finally:
            engine_log.removeHandler(handler)
        _close_attempt(ctx, run, handler.lines, outcome, result, error)


REDIS_WAIT_CAP_S = 30.0


def _close_attempt(ctx: WorkerContext, run: RunAttempt, lines: list[str], outcome: str,
                   result: str | None, error: ErrorInfo | None) -> None:
    """Stores the attempt's log and closes the job, waiting for Redis until the task's hard
    time limit. The outcome is only in this process: given up on (the task raised and Celery
    acknowledged it), a Redis outage longer than ``redis_retry_s`` here left the job
    'running' for good. Waiting holds no other job back (Redis is the queue too). Killed at
    the hard limit while waiting, the job is sent again by the API (``app.stalled``)."""
    pause, log_saved = 1.0, False
    while True:
        try:
            if not log_saved:
                # no second wait on a store that just failed the job for not answering
                _save_log(ctx, lines, retry=not (error and error.type == StoreUnavailable.type))
                log_saved = True
            closed = _finish(ctx.r, ctx.settings, ctx.job_id, run, outcome, result, error)
            break
        except (redis.ConnectionError, redis.TimeoutError, SoftTimeLimitExceeded) as exc:
            # (the soft limit landing here would lose an outcome the job has already reached)
            log.warning("job %s attempt %d ended %s but could not record it (%s); trying again "
                        "in %g s", ctx.job_id, run.attempt, outcome, f"{type(exc).__name__}: {exc}",
                        pause)
            _sleep_through_soft_limit(pause)
            pause = min(REDIS_WAIT_CAP_S, pause * 2)
    if not closed and ctx.r.hmget(records.job_key(ctx.job_id), ["state", "attempts"]) != [
            outcome, str(run.attempt)]:  # not a FINISH of ours whose reply was lost
        log.warning("job %s attempt %d finished after it was closed elsewhere", ctx.job_id,
                    run.attempt)


def _sleep_through_soft_limit(seconds: float) -> None:
    """A sleep the soft time limit's exception does not end (see ``_close_attempt``)."""
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        log.warning("the soft time limit passed while waiting for Redis; waiting on")


MEMO_KEEP_S = 86_400


def close_killed_attempt(job_id: str, worker: str, limit_s: float) -> bool:
    """Fails the running attempt of ``job_id`` on ``worker`` whose pool process Celery killed at
    the hard time limit (it was inside native code, where the soft limit's exception cannot
    land). Runs in the worker's main process; Celery acknowledges the message, so nobody else
    would ever close the job. Whether it was closed here."""
    settings = get_settings()
    r = sync_client(settings)  # not _services(): the main process has no store to fork away
    try:
        h = r.hgetall(records.job_key(job_id))
        attempt = h.get("attempts", "")
        raw = r.hget(records.runs_key(job_id), attempt) if attempt else None
        if h.get("state") != "running" or raw is None:
            return False
        run = RunAttempt.model_validate_json(raw)
        if run.worker != worker or run.outcome != "running":
            return False
        error = ErrorInfo(type="time_limit", message=(
            f"the job ran past its time limit of {limit_s:g} s and its process was killed: it "
            "was inside a call (native code) that the earlier soft limit could not interrupt"))
        _append_log(r, settings, job_id, run.attempt, f"{records.iso()} ERROR {error.message}")
        closed = _finish(r, settings, job_id, run, "failed", None, error)
        held = r.get(records.lease_key(job_id))  # the killed process's: nobody renews it now
        if held is not None and str(held).startswith(f"{worker}:"):
            r.eval(RELEASE_IF_HELD, 1, records.lease_key(job_id), held)
        log.error("job %s attempt %s: %s", job_id, attempt, error.message)
        if closed:
            _store_killed_log(job_id, run.attempt)
        return closed
    finally:
        r.close()


def _store_killed_log(job_id: str, attempt: int) -> None:
    """The killed attempt's log artifact, from Redis's list, in a process of its own (see
    :mod:`workers.killed_log`); not waited for here, in the worker's main process."""
    try:
        proc = subprocess.Popen([sys.executable, "-m", "workers.killed_log", job_id,
                                 str(attempt)], stdin=subprocess.DEVNULL)
    except OSError:  # the job is closed; only its log artifact is missing
        log.warning("could not start the process that stores the log of %s", job_id,
                    exc_info=True)
        return
    threading.Thread(target=proc.wait, daemon=True).start()  # reaps it


def execute_item(job_id: str, attempt: int, item: dict[str, Any], worker: str) -> None:
    """A piece of a running job that its worker fanned out. Best effort: a piece that fails or
    finds the job over is dropped, and the job's own worker computes whatever is missing."""
    from workers.engine import registry

    settings, r, store = _services()
    h: dict[str, str] = r.hgetall(records.job_key(job_id))
    if h.get("state") != "running" or h.get("attempts") != str(attempt):
        log.info("job %s is %s (attempt %s); dropping piece %s", job_id, h.get("state"),
                 h.get("attempts"), item)
        return
    with scratch(f"{job_id}-item") as tmp:
        ctx = WorkerContext(job_id, h["tenant"], attempt, settings, r, store, tmp,
                            queue=h.get("queue") or settings.default_queue, who=worker)
        try:
            spec = _spec_adapter.validate_json(h["spec"])
            registry.run_item(spec, ctx, item)
            ctx.append_log(f"{records.iso()} INFO {worker} computed piece {item}")
        except JobCancelled:
            return
        except Exception as exc:
            log.warning("piece %s of %s failed: %s", item, job_id, exc, exc_info=True)


def _save_log(ctx: WorkerContext, lines: list[str], retry: bool = True) -> None:
    """The attempt's log as an artifact, so it outlives Redis's capped list (the artifact size
    limit does not apply: the log is capped by line count)."""
    data = ("\n".join(lines) + "\n").encode()
    try:
        ctx._store_artifact(f"job-attempt{ctx.attempt}.log", data, "text/plain", retry)
    except JobCancelled:
        log.info("job %s was deleted before its log was stored", ctx.job_id)
    except (redis.ConnectionError, redis.TimeoutError):
        raise  # Redis away: the caller waits for it and stores the log then
    except Exception:
        log.warning("could not store the log of %s (sha %s)", ctx.job_id,
                    hashlib.sha256(data).hexdigest()[:12], exc_info=True)
