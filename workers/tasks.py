"""Celery tasks: thin wrappers that hand a job id to the runner."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from celery.exceptions import TimeLimitExceeded
from celery.signals import task_failure, worker_process_init

from workers import heartbeat, runner

heartbeat.connect_signals()


@worker_process_init.connect(weak=False)
def _start_pool_process(**_: Any) -> None:
    """Import the engine when a pool process starts, not inside the first job's time limit
    (a redelivered job on a fresh worker would otherwise spend ~4 s of it importing), and set
    the allocator up before anything is timed (see ``env.tune_allocator``)."""
    import workers.engine.registry  # noqa: F401
    from workers.engine import env

    env.tune_allocator()


@task_failure.connect(weak=False)
def _hard_time_limit(sender: Any = None, task_id: str | None = None, exception: Any = None,
                     args: Any = None, **_: Any) -> None:
    """Celery killed a job's pool process at the hard time limit (this runs in the worker's
    main process): close the job, which its killed attempt could not do."""
    if (isinstance(exception, TimeLimitExceeded) and getattr(sender, "name", "") == run_job.name
            and args and heartbeat.node_name):
        limit = float(exception.args[0]) if exception.args else 0.0
        runner.close_killed_attempt(str(args[0]), heartbeat.node_name, limit)


@shared_task(name="modelpress.run_job", bind=True)
def run_job(self: Any, job_id: str) -> None:
    runner.execute(job_id, worker=str(self.request.hostname or "worker"))


@shared_task(name=runner.ITEM_TASK, bind=True)
def run_item(self: Any, job_id: str, attempt: int, item: dict[str, Any]) -> None:
    runner.execute_item(job_id, attempt, item, worker=str(self.request.hostname or "worker"))
