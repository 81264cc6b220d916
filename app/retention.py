"""Deletes finished jobs older than ``job_retention_days`` (off when 0).

Every API process runs the loop; a Redis lock per interval lets one of them sweep. A sweep reads
the oldest entries of the finished-jobs index (each job enters it when it reaches a final state)
and deletes each job exactly as ``DELETE /v1/jobs/{id}`` does, files first. A store that does not
answer ends the sweep early; the jobs stay indexed and the next interval tries again.
"""

from __future__ import annotations

import logging
import time
import uuid

from app import jobs, loops, records
from app.deps import Services
from app.errors import ApiError

log = logging.getLogger("modelpress.retention")
LOCK_KEY = f"{records.P}:retention:lock"
BATCH = 200


def interval_s(retention_days: float) -> float:
    """A quarter of the retention period, between 1 s and an hour."""
    return min(3600.0, max(1.0, retention_days * 86_400 / 4))


async def sweep(svc: Services) -> int:
    """Delete every job that finished more than the retention period ago; returns how many
    were deleted."""
    cutoff = time.time() - svc.settings.job_retention_days * 86_400
    deleted = 0
    while True:
        due: list[str] = await svc.redis.zrangebyscore(records.FINISHED_KEY, "-inf", cutoff,
                                                       start=0, num=BATCH)
        if not due:
            return deleted
        for job_id in due:
            tenant = await svc.redis.hget(records.job_key(job_id), "tenant")
            if tenant is None:  # deleted by hand meanwhile
                await svc.redis.zrem(records.FINISHED_KEY, job_id)
                continue
            try:
                await jobs.delete_job(svc, tenant, job_id)
                deleted += 1
            except ApiError as exc:
                if exc.status >= 500:  # the store (down, or refusing): kept for the next sweep
                    log.warning("retention sweep stopped at %s: %s", job_id, exc.message)
                    return deleted
                # 404: gone already; 409: not final (no path leads a finished job back to
                # queued or running today: `assets._active_jobs_using` relies on that too)
                await svc.redis.zrem(records.FINISHED_KEY, job_id)


async def run(svc: Services) -> None:
    """The API's background loop (started by the app's lifespan when retention is on)."""
    every = interval_s(svc.settings.job_retention_days)
    token = uuid.uuid4().hex

    async def step() -> None:
        if await svc.redis.set(LOCK_KEY, token, nx=True, px=int(every * 1000)):
            n = await sweep(svc)
            if n:
                log.info("retention: deleted %d job(s) finished more than %g days ago", n,
                         svc.settings.job_retention_days)

    await loops.repeat(step, every, "retention sweep", log)
