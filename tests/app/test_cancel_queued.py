"""Cancelling a queued job, at the module level against a real Redis and a real Celery producer:
the job is final at once and its progress no longer says it waits for a worker."""

from __future__ import annotations

from app import jobs
from app.config import Settings
from app.deps import Services
from app.schemas import Job
from tests.app.conftest import TENANT, body, run


def test_a_cancelled_queued_job_no_longer_waits_for_a_worker(settings: Settings) -> None:
    async def create_and_cancel(svc: Services) -> tuple[Job, Job]:
        job, _ = await jobs.create_job(svc, TENANT, body())
        return job, await jobs.cancel_job(svc, TENANT, job.id, force=False)

    before, after = run(settings, create_and_cancel)
    assert before.progress.message.startswith("waiting for a worker")  # no worker in this test
    assert after.state == "cancelled" and after.finished_at is not None
    assert (after.progress.stage, after.progress.message) == (
        "cancelled", "cancelled before it started")
