"""A worker SIGKILLed in the middle of a job: the job is redelivered to a new worker after the
visibility timeout, runs to the end exactly once, and its record says it was retried."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import records
from app.schemas import BenchmarkSpec, Job, ModelRef
from modelpress import Client, _stack
from tests.conftest import Stack, make_stack, running
from tests.helpers import measured
from tests.integration.test_service import sse_events, wait_for

pytestmark = pytest.mark.slow


def _stack_with(tmp_path: Path, redis_server: _stack.EmbeddedRedis, shared_store: Path,
                **env: str) -> Iterator[Stack]:
    yield from running(make_stack(tmp_path, redis_server,
                                  {"MODELPRESS_STORE_URL": shared_store.as_uri(), **env}))


@pytest.fixture
def crash_stack(tmp_path: Path, redis_server: _stack.EmbeddedRedis,
                shared_store: Path) -> Iterator[Stack]:
    yield from _stack_with(tmp_path, redis_server, shared_store,
                           MODELPRESS_TASK_TIME_LIMIT_S="8", MODELPRESS_VISIBILITY_TIMEOUT_S="10")


def _measuring(client: Client, min_time_s: float = 3) -> Job:
    """A digits-cnn benchmark (measuring for ``min_time_s``) whose first attempt is inside its
    measuring loop (the zoo cache warmed first by a short job, so the attempt gets there
    quickly)."""
    warm = client.jobs.create(BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), repeats=3,
                                            per_layer=False))
    client.jobs.wait(warm.id, timeout=60)
    job = client.jobs.create(BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), repeats=10,
                                           min_time_s=min_time_s, per_layer=False))
    wait_for(lambda: client.jobs.get(job.id).progress.stage == "measure", 30,
             "the first attempt to be measuring")
    return job


def test_sigkill_mid_job_is_retried_once(crash_stack: Stack) -> None:
    s = crash_stack
    key = s.key()
    with s.client(key) as client:
        job = _measuring(client)
        _stack.kill_process(s.workers[0])  # SIGKILL to the worker's whole process group
        assert client.jobs.get(job.id).state == "running"

        t_kill = time.monotonic()
        s.start_worker("w2")
        done = client.jobs.wait(job.id, timeout=90)
        waited = time.monotonic() - t_kill

    assert done.state == "succeeded"
    assert done.attempts == 2 and done.retried
    outcomes = [(r.attempt, r.outcome) for r in done.runs]
    assert outcomes == [(1, "lost"), (2, "succeeded")]
    assert done.runs[0].worker.startswith("w1@") and done.runs[1].worker.startswith("w2@")
    # Redelivery waits for the visibility timeout, not less: the lost delivery was not acked.
    assert waited >= 8, waited
    events = sse_events(s, key, job.id)
    finals = [e for e in events if e["event"] == "state" and e["state"] == "succeeded"]
    assert len(finals) == 1
    assert {a.name for a in done.artifacts} >= {"benchmark.json", "job-attempt2.log"}


def test_a_job_whose_worker_died_is_sent_again_before_the_visibility_timeout(
        tmp_path: Path, redis_server: _stack.EmbeddedRedis, shared_store: Path) -> None:
    """The whole worker SIGKILLed with an hour's visibility timeout: the API sees the job's lease
    gone (heartbeat 1 s: it lives 3 s) and sends the job again after MODELPRESS_STALLED_JOB_S."""
    for s in _stack_with(tmp_path, redis_server, shared_store, MODELPRESS_STALLED_JOB_S="4",
                         MODELPRESS_TASK_TIME_LIMIT_S="600",
                         MODELPRESS_VISIBILITY_TIMEOUT_S="3600"):
        with s.client() as client:
            job = _measuring(client)
            _stack.kill_process(s.workers[0])
            t_kill = time.monotonic()
            s.start_worker("w2")
            done = client.jobs.wait(job.id, timeout=90)
            waited = time.monotonic() - t_kill
        assert done.state == "succeeded", done.error
        assert [(r.attempt, r.outcome) for r in done.runs] == [(1, "lost"), (2, "succeeded")]
        assert done.runs[1].worker.startswith("w2@")
        assert any("sent it to the queue again" in line for line in s.dump_logs().splitlines())
        measured.append(f"stalled job: worker SIGKILLed, job done on a new worker {waited:.1f} s "
                        "later (stalled_job_s 4, lease 3 s, visibility timeout 3600 s)")


@pytest.fixture
def oom_stack(tmp_path: Path, redis_server: _stack.EmbeddedRedis,
              shared_store: Path) -> Iterator[Stack]:
    # the default heartbeat: a lease lives 15 s, longer than a new pool process takes to start
    yield from _stack_with(tmp_path, redis_server, shared_store, MODELPRESS_WORKER_HEARTBEAT_S="5")


def test_a_killed_pool_process_is_retried_at_once(oom_stack: Stack) -> None:
    """The OOM killer's case: only the pool process dies, its worker lives on. Celery hands the
    job straight back (reject on worker lost), seconds before the dead process's lease runs
    out; that delivery is the only message left, so it must run the job, not drop it."""
    s = oom_stack
    with s.client() as client:
        job = _measuring(client)
        holder = s.redis.get(records.lease_key(job.id))
        assert holder is not None and holder.startswith("w1@")
        pid = int(holder.split(":")[1])
        assert pid != s.workers[0].pid  # a pool process, not the worker itself
        os.kill(pid, signal.SIGKILL)
        done = client.jobs.wait(job.id, timeout=60)
        log = client.jobs.log(job.id, tail=1000)

    assert done.state == "succeeded", done.error
    assert [(r.attempt, r.outcome) for r in done.runs] == [(1, "lost"), (2, "succeeded")]
    # taken at once from the dead process, not after its lease or the visibility timeout ran out
    assert "a process of this worker that is gone; taking it" in s.log("w1").read_text()
    assert any("attempt 2 on w1@" in line for line in log)
    assert s.workers[0].poll() is None  # the worker itself lived on


@pytest.fixture
def dead_worker_stack(tmp_path: Path, redis_server: _stack.EmbeddedRedis,
                      shared_store: Path) -> Iterator[Stack]:
    # a one-second heartbeat: a dead worker's lease runs out after three seconds
    yield from _stack_with(tmp_path, redis_server, shared_store,
                           MODELPRESS_TASK_TIME_LIMIT_S="8", MODELPRESS_VISIBILITY_TIMEOUT_S="10",
                           MODELPRESS_WORKER_HEARTBEAT_S="1")


def test_a_plain_cancel_closes_a_dead_workers_job_once_its_lease_is_gone(
        dead_worker_stack: Stack) -> None:
    s = dead_worker_stack
    with s.client() as client:
        job = _measuring(client)
        lease = records.lease_key(job.id)
        holder = s.redis.get(lease)
        assert holder is not None
        _stack.kill_process(s.workers[0])
        # While the lease lives, the worker may be alive: a plain cancel only sets the flag.
        # (Set again here, as the dead worker held it, so the check does not race its last
        # three seconds.)
        s.redis.set(lease, holder, ex=60)
        asked = client.jobs.cancel(job.id)
        assert asked.state == "running" and asked.cancel_requested
        s.redis.expire(lease, 1)  # then let it run out, as it would with nobody renewing it
        wait_for(lambda: not s.redis.exists(lease), 10, "the dead worker's lease to run out")

        closed = client.jobs.cancel(job.id)
        assert closed.state == "cancelled" and closed.finished_at is not None
        assert closed.error is not None and "no heartbeat" in closed.error.message
        assert [(r.attempt, r.outcome) for r in closed.runs] == [(1, "lost")]
        assert client.jobs.wait(job.id, timeout=5, raise_on_failure=False).state == "cancelled"

        # The queue still holds the unacknowledged delivery: a new worker gets it after the
        # visibility timeout and drops it instead of running the job again.
        s.start_worker("w2")
        wait_for(lambda: f"job {job.id} is already cancelled; dropping a repeated delivery"
                 in s.log("w2").read_text(),
                 60, "the redelivered job to be dropped")
        after = client.jobs.get(job.id)
        assert after.state == "cancelled" and after.attempts == 1 and after.runs == closed.runs
