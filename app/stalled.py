"""Sends a running job to the queue again once its worker is gone: its lease has not been
renewed for a while and no other delivery took it.

Celery hands a job on by itself when a pool process dies (the worker rejects its message) or a
worker stops with SIGTERM (the message goes back to the queue). Not when the whole worker dies
(SIGKILL, a lost machine): its message is handed on after the broker's visibility timeout,
hours. And not when the message was acknowledged with the job unfinished (a task that raised
past the runner, a duplicate delivery dropped while the first worker still lived and which then
died). The job would show 'running' all that time, or for good.

Every API process runs the loop. A worker lists its job in ``records.RUNNING_KEY`` as it starts
it; a job whose lease (``records.lease_key``, renewed every heartbeat) has been missing for the
``stalled_job_s`` setting (60 s) is sent once per attempt (``records.STALLED`` decides,
atomically, so one process of several sends it). The new delivery runs the next attempt and
marks the lost one; the old message, if the broker hands it on later, finds the job finished
or held and is dropped (``workers.runner.execute``). Jobs started before this loop existed are
not listed: they wait for the visibility timeout as before.
"""

from __future__ import annotations

import logging
import time

from app import jobs, loops, records
from app.deps import Services

log = logging.getLogger("modelpress.stalled")


async def resend(svc: Services, stale_s: float | None = None) -> int:
    """One round over the running jobs: send those whose lease has been missing for
    ``stale_s`` (default: the ``stalled_job_s`` setting) at two rounds; how many were sent."""
    if stale_s is None:
        stale_s = svc.settings.stalled_job_s
    sent = 0
    for job_id in await svc.redis.zrange(records.RUNNING_KEY, 0, -1):
        reply = await svc.redis.eval(records.STALLED, 2, records.job_key(job_id),
                                     records.lease_key(job_id), time.time(), stale_s)
        verdict = int(reply[0])
        if verdict == -1:  # finished, or deleted
            await svc.redis.zrem(records.RUNNING_KEY, job_id)
            continue
        if verdict != 1:
            continue
        queue, attempt = reply[1], reply[2]
        try:
            await jobs.send(svc, job_id, queue or svc.settings.default_queue)
        except Exception:  # the broker is away: the next round tries again
            await svc.redis.hdel(records.job_key(job_id), "resent_attempt")
            log.warning("could not send job %s again, whose worker is gone", job_id,
                        exc_info=True)
            continue
        log.warning("job %s: attempt %s has had no worker for over %g s (no lease renewed); "
                    "sent it to the queue again", job_id, attempt, stale_s)
        sent += 1
    return sent


async def run(svc: Services) -> None:
    """The API's background loop (started by the app's lifespan)."""
    await loops.repeat(lambda: resend(svc), svc.settings.stalled_job_s / 2,
                       "sending stalled jobs again", log)
