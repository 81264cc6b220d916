"""Ends upload deletes left pending: the API process died (or its put-back failed) after taking
the record and nobody repeated the DELETE with its key.

Every API process runs the loop. A pending delete older than ``STALE_S`` is finished exactly as a
repeat of the DELETE with its key would finish it (``assets.delete_asset``, which claims it):
files and record go, or, if a queued or running job names the upload now, the record is put
back. A store that does not answer leaves it pending for the next round.
"""

from __future__ import annotations

import json
import logging
import time

from app import assets, loops, records
from app.deps import Services
from app.errors import ApiError

log = logging.getLogger("modelpress.pending")
STALE_S = 600.0  # a live DELETE takes seconds; ten minutes means nobody is finishing it
EVERY_S = 60.0


async def resolve(svc: Services, stale_s: float = STALE_S) -> int:
    """Finish or undo every pending delete taken more than ``stale_s`` ago; returns how many
    ended (deleted, or put back because a live job names the upload)."""
    due: list[str] = await svc.redis.zrangebyscore(records.PENDING_DELETES_KEY, "-inf",
                                                   time.time() - stale_s)
    ended = 0
    for replay in due:
        raw = await svc.redis.get(replay)
        data = json.loads(raw) if raw else {}
        if "pending" not in data:  # ended meanwhile
            await svc.redis.zrem(records.PENDING_DELETES_KEY, replay)
            continue
        tenant, key = records.split_delete_replay_key(replay)
        what, _, asset_id = str(data["target"]).partition(" ")
        try:
            await assets.delete_asset(svc, "models" if what == "model" else "datasets", tenant,
                                      asset_id, key)
            log.info("finished the pending delete of %s (tenant %s)", data["target"], tenant)
        except ApiError as exc:
            if exc.status >= 500:  # the store: pending until the next round
                log.warning("pending delete of %s: %s", data["target"], exc.message)
                continue
            log.info("pending delete of %s undone: %s", data["target"], exc.message)  # 409
        await svc.redis.zrem(records.PENDING_DELETES_KEY, replay)  # (ended: gone already)
        ended += 1
    return ended


async def run(svc: Services) -> None:
    """The API's background loop (started by the app's lifespan)."""
    await loops.repeat(lambda: resolve(svc), EVERY_S, "resolving pending deletes", log)
