"""Which queues the live workers consume, from their heartbeat keys in a real Redis."""

from __future__ import annotations

import json

import redis

from app import records
from app.config import Settings
from app.jobs import served_queues
from tests.app.conftest import run
from workers.heartbeat import announce, withdraw


def served(settings: Settings) -> tuple[int, set[str] | None]:
    out: tuple[int, set[str] | None] = run(settings, served_queues)
    return out


def test_the_union_of_the_workers_queues_or_unknown(settings: Settings) -> None:
    r = redis.Redis.from_url(settings.redis_url or "")
    assert served(settings) == (0, set())
    announce(r, "a@h", json.dumps({"hostname": "a@h", "queues": ["cpu"]}), 60)
    announce(r, "b@h", json.dumps({"hostname": "b@h", "queues": ["cpu", "gpu"]}), 60)
    assert served(settings) == (2, {"cpu", "gpu"})
    # a worker from before heartbeats named their queues: what it serves is unknown
    announce(r, "c@h", json.dumps({"hostname": "c@h"}), 60)
    assert served(settings) == (3, None)


def test_a_worker_whose_heartbeat_expired_is_not_counted(settings: Settings) -> None:
    r = redis.Redis.from_url(settings.redis_url or "")
    announce(r, "a@h", json.dumps({"hostname": "a@h", "queues": ["cpu"]}), 60)
    announce(r, "gone@h", json.dumps({"hostname": "gone@h", "queues": ["gpu"]}), 60)
    r.delete(records.worker_key("gone@h"))  # as its TTL does when it stops beating
    assert served(settings) == (1, {"cpu"})
    assert r.smembers(records.WORKERS_KEY) == {b"a@h"}  # the dead name is dropped
    announce(r, "gone@h", json.dumps({"hostname": "gone@h", "queues": ["gpu"]}), 60)
    assert served(settings) == (2, {"cpu", "gpu"})  # it beat again: counted again
    withdraw(r, "a@h")  # a worker that stops cleanly leaves at once
    assert served(settings) == (1, {"gpu"})


def test_forgetting_keeps_a_name_whose_key_came_back(settings: Settings) -> None:
    """Between the read and the clean-up a stalled worker may beat again: it stays listed."""
    r = redis.Redis.from_url(settings.redis_url or "")
    announce(r, "back@h", "{}", 60)
    r.sadd(records.WORKERS_KEY, "dead@h")
    r.eval(records.FORGET_DEAD_WORKERS, 3, records.WORKERS_KEY, records.worker_key("back@h"),
           records.worker_key("dead@h"), "back@h", "dead@h")
    assert r.smembers(records.WORKERS_KEY) == {b"back@h"}
