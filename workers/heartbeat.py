"""Liveness keys in Redis: one per worker process (read by ``/readyz``) and one lease per running
job (so a redelivered job is not run twice while its first worker is still alive)."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutdown

from app import records
from app.config import get_settings
from app.redis_client import sync_client

log = logging.getLogger("modelpress.worker")

# Deletes the key only if we still hold it.
RELEASE_IF_HELD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Extends the key's TTL only if we still hold it: a holder whose key expired (a stalled
# process) must not extend, or take over, the key of whoever holds it now.
RENEW_IF_HELD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# A job lease's renewal: extended while we hold it; taken again if it ran out (Redis was down or
# stalled for longer than its TTL, with its expiry counting on) and nobody took it since, while
# the job still runs under our attempt. Without this the attempt ran on with no lease: a cancel
# took it for a dead worker's job and a redelivery started a second attempt beside it.
# KEYS: lease, job   ARGV: holder, ttl, attempt. Returns 1 renewed, 2 taken again, 0 not ours.
RENEW_OR_RETAKE = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if held then return 0 end
local job = redis.call('HMGET', KEYS[2], 'state', 'attempts')
if job[1] ~= 'running' or job[2] ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 2
"""

# Replaces the key's holder ARGV[1] (known to be gone) by ARGV[2], only if ARGV[1] still holds it.
TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""


class Beat:
    """Calls ``tick`` every ``interval`` seconds on a daemon thread until stopped."""

    def __init__(self, interval: float, tick: Callable[[], None]) -> None:
        self._interval = interval
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="modelpress-beat")

    def start(self) -> Beat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval + 1)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._tick()
            except Exception:  # a missed beat is retried next period; never kill the job for it
                log.warning("heartbeat failed", exc_info=True)


class Lease:
    """A job lease: SET NX with a TTL of three heartbeats, refreshed while the job runs."""

    def __init__(self, r: redis.Redis, job_id: str, holder: str, interval: float) -> None:
        self._r = r
        self.job_id = job_id
        self.key = records.lease_key(job_id)
        self.attempt = 0  # set by start(): the attempt of the job this lease is renewed for
        self.holder = holder
        self.ttl = records.lease_ttl_s(interval)
        self._beat = Beat(interval, self._refresh)

    def acquire(self) -> bool:
        return bool(self._r.set(self.key, self.holder, nx=True, ex=self.ttl))

    def take_over(self, dead: str) -> bool:
        """Replaces the lease of ``dead``, a holder known to be gone, with ours."""
        return bool(self._r.eval(TAKE_OVER, 1, self.key, dead, self.holder, self.ttl))

    def current_holder(self) -> str | None:
        value = self._r.get(self.key)
        return None if value is None else str(value)

    def start(self, attempt: int) -> None:
        """Renews the lease every heartbeat while ``attempt`` runs the job."""
        self.attempt = attempt
        self._beat.start()

    def _refresh(self) -> None:
        renewed = self._r.eval(RENEW_OR_RETAKE, 2, self.key, records.job_key(self.job_id),
                               self.holder, self.ttl, str(self.attempt))
        if int(renewed) == 2:
            log.warning("the lease of job %s ran out while attempt %d still ran it (Redis did not "
                        "answer, or this process stalled, for over %d s); taken again",
                        self.job_id, self.attempt, self.ttl)

    def release(self) -> None:
        self._beat.stop()
        self._r.eval(RELEASE_IF_HELD, 1, self.key, self.holder)


def announce(r: redis.Redis, hostname: str, info: str, ttl: int) -> None:
    """This worker is alive for ``ttl`` more seconds; ``info`` says which queues it consumes."""
    with r.pipeline(transaction=False) as pipe:
        pipe.sadd(records.WORKERS_KEY, hostname)
        pipe.set(records.worker_key(hostname), info, ex=ttl)
        pipe.execute()


def withdraw(r: redis.Redis, hostname: str) -> None:
    with r.pipeline(transaction=False) as pipe:
        pipe.delete(records.worker_key(hostname))
        pipe.srem(records.WORKERS_KEY, hostname)
        pipe.execute()


_worker_beat: Beat | None = None
node_name: str | None = None  # this worker's Celery host name, once it is ready (main process)


def _on_ready(sender: Any = None, **_: Any) -> None:
    global _worker_beat, node_name
    settings = get_settings()
    r = sync_client(settings)
    hostname = str(getattr(sender, "hostname", None) or f"worker-{os.getpid()}")
    node_name = hostname
    ttl = max(2, int(settings.worker_heartbeat_s * 3 + 0.999))
    # The queues it consumes (`-Q`): the API tells a job on a queue nobody serves that it waits.
    amqp = getattr(getattr(sender, "app", None), "amqp", None)
    queues = sorted(getattr(getattr(amqp, "queues", None), "consume_from", None) or [])
    info = json.dumps({"hostname": hostname, "pid": os.getpid(), "started_at": records.iso(),
                       "queues": queues})

    def tick() -> None:
        announce(r, hostname, info, ttl)

    tick()
    _worker_beat = Beat(settings.worker_heartbeat_s, tick).start()

    def stop(**_: Any) -> None:
        if _worker_beat:
            _worker_beat.stop()
        withdraw(r, hostname)

    worker_shutdown.connect(stop, weak=False)


def connect_signals() -> None:
    worker_ready.connect(_on_ready, weak=False)
