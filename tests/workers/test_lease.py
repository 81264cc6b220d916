"""A job's lease through a Redis outage longer than its TTL: the attempt that still runs the job
takes it again when Redis is back (a cancel would otherwise take the job for a dead worker's, and
a redelivery would start a second attempt beside it), and only that attempt does."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from app import records
from app.config import Settings
from app.redis_client import sync_client
from modelpress import _stack
from workers.heartbeat import Lease

JOB = "job_lease_test"
HEARTBEAT_S = 0.5  # a lease lives max(2, 3 heartbeats) = 2 s


def _until(what: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(0.05)
    return what()


def test_a_running_attempt_takes_its_lease_again_after_an_outage(tmp_path: Path) -> None:
    server = _stack.EmbeddedRedis(tmp_path / "redis", appendonly=True).start()
    r = sync_client(Settings(redis_url=server.url))
    try:
        r.hset(records.job_key(JOB), mapping={"state": "running", "attempts": "1"})
        lease = Lease(r, JOB, "w1@host:100:aaaa", HEARTBEAT_S)
        assert lease.ttl == 2 and lease.acquire()
        lease.start(1)
        try:
            # Down longer than the lease lives: its expiry (kept in the AOF) passes meanwhile.
            server.stop()
            time.sleep(lease.ttl + 0.5)
            server.start()
            # Held by its attempt again within a few heartbeats (the renewal that was waiting
            # on Redis goes through first); a duplicate delivery finds it taken.
            assert _until(lambda: lease.current_holder() == lease.holder, 6), \
                lease.current_holder()
            assert not Lease(r, JOB, "w2@host:200:bbbb", HEARTBEAT_S).acquire()

            # Replaced by a later attempt (which took the lease, then gave it up): not retaken.
            r.hset(records.job_key(JOB), "attempts", "2")
            r.delete(lease.key)
            time.sleep(4 * HEARTBEAT_S)
            assert lease.current_holder() is None
        finally:
            lease.release()
        assert lease.current_holder() is None
    finally:
        r.close()
        server.stop()
