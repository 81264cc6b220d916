"""A worker stopped with SIGTERM in the middle of a job (as Docker, Kubernetes and `modelpress
serve` stop it): it gives the job its grace period, hands it back to the queue and exits; another
worker takes the job at once instead of after the visibility timeout (hours in production)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelpress import _stack
from tests.conftest import Stack
from tests.helpers import measured
from tests.integration.test_service import wait_for
from tests.integration.test_worker_crash import _measuring, _stack_with

pytestmark = pytest.mark.slow

GRACE_S = 2.0
VISIBILITY_S = 300


@pytest.fixture
def stop_stack(tmp_path: Path, redis_server: _stack.EmbeddedRedis,
               shared_store: Path) -> Iterator[Stack]:
    yield from _stack_with(tmp_path, redis_server, shared_store,
                           MODELPRESS_WORKER_STOP_GRACE_S=str(GRACE_S),
                           MODELPRESS_TASK_TIME_LIMIT_S=str(VISIBILITY_S - 1),
                           MODELPRESS_VISIBILITY_TIMEOUT_S=str(VISIBILITY_S))


def test_a_stopped_worker_hands_its_job_back_at_once(stop_stack: Stack) -> None:
    s = stop_stack
    with s.client() as client:
        job = _measuring(client, min_time_s=120)  # far longer than the grace period
        w1 = s.workers[0]
        t_stop = time.monotonic()
        _stack.stop_worker(w1, GRACE_S)  # SIGTERM to the main process; SIGKILL after grace + 10
        stopped = time.monotonic() - t_stop
        assert w1.returncode != -9, "the worker did not exit on SIGTERM; it was killed"
        assert stopped < GRACE_S + 8, stopped
        assert client.jobs.get(job.id).state == "running"  # nobody has it yet; not failed

        s.start_worker("w2")
        wait_for(lambda: client.jobs.get(job.id).attempts == 2, 60, "a second attempt")
        taken = time.monotonic() - t_stop
        assert taken < VISIBILITY_S / 4, taken  # handed back, not left to the visibility timeout
        running_job = client.jobs.get(job.id)
        assert [(r.attempt, r.outcome) for r in running_job.runs] == [(1, "lost"), (2, "running")]
        assert running_job.runs[0].worker.startswith("w1@")
        assert running_job.runs[1].worker.startswith("w2@")
        wait_for(lambda: any("did not finish (its worker stopped or died)" in line
                             for line in client.jobs.log(job.id)), 30, "attempt 2's log line")
        assert client.jobs.wait(client.jobs.cancel(job.id).id, timeout=60,
                                raise_on_failure=False).state == "cancelled"
    measured.append(f"worker stop: SIGTERM mid-job, exited in {stopped:.1f} s (grace {GRACE_S} s); "
                    f"a new worker started the job's second attempt {taken:.1f} s after the "
                    f"SIGTERM (visibility timeout {VISIBILITY_S} s)")
