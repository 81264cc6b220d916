"""Sends jobs whose create wrote the record but never handed it to the queue: the API process
died (a restart, the OOM killer) between the two, and the job would have waited as `queued`
forever.

Every API process runs the loop. A create lists its job in ``records.UNSENT_KEY`` in the same
transaction that writes it, and takes it off once the queue has it; an entry older than
``STALE_S`` means nobody will. The process that removes the entry sends the job if it is still
queued (a cancelled or deleted one is only dropped). A job that did reach the queue but was not
taken off the list (Redis went away just then) may be sent twice: the second delivery finds it
running or finished and is dropped (``workers.runner.execute``).
"""

from __future__ import annotations

import logging
import time

from app import jobs, loops, records
from app.deps import Services

log = logging.getLogger("modelpress.unsent")
STALE_S = 60.0  # a create sends its job within milliseconds of writing it
EVERY_S = 30.0


async def resend(svc: Services, stale_s: float = STALE_S) -> int:
    """Send every job listed as unsent for more than ``stale_s`` that is still queued; returns
    how many were sent."""
    due: list[str] = await svc.redis.zrangebyscore(records.UNSENT_KEY, "-inf",
                                                   time.time() - stale_s)
    sent = 0
    for job_id in due:
        if not await svc.redis.zrem(records.UNSENT_KEY, job_id):  # another API process has it
            continue
        state, queue = await svc.redis.hmget(records.job_key(job_id), ["state", "queue"])
        if state != "queued":  # cancelled or deleted meanwhile
            continue
        try:
            await jobs.send(svc, job_id, queue or svc.settings.default_queue)
        except Exception:  # the broker is away: listed again for the next round
            await svc.redis.zadd(records.UNSENT_KEY, {job_id: time.time() - stale_s})
            log.warning("could not send job %s, whose create never reached the queue", job_id,
                        exc_info=True)
            continue
        log.info("sent job %s: its create wrote it but never reached the queue", job_id)
        sent += 1
    return sent


async def run(svc: Services) -> None:
    """The API's background loop (started by the app's lifespan)."""
    await loops.repeat(lambda: resend(svc), EVERY_S, "sending unsent jobs", log)
