"""A worker SIGKILLed in the middle of a mixed-precision search: the job is redelivered once and
its second attempt resumes from the memo of finished evaluations (a Redis hash per job), so no
evaluation finished before the kill is computed again and none is lost; pieces the lost attempt
had offered to other workers only add to that memo."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from app import records
from app.config import Settings
from app.schemas import MixedPrecisionResult, MixedPrecisionSpec
from app.storage import open_store
from modelpress import _stack
from tests.conftest import Stack, make_stack, running
from tests.helpers import measured
from workers.engine import datasets, zoo

pytestmark = pytest.mark.slow

# Two levels with no latency gate, a tight budget and the greedy baseline: the search stage runs
# some 30 evaluations instead of a handful, so there is a search to interrupt.
SPEC = {"sensitivity": {"probes": 4, "calibration_samples": 64}, "repeats": 5, "warmup": 1,
        "frontier_points": 3, "levels": ["int8", "int4"], "latency_gate": False,
        "baselines": ["hessian", "random", "greedy"],
        "budget": {"mode": "absolute", "value": 0.003}}
TILES = 10  # copies of the digits test split in the evaluation data: ~10x slower evaluations


@pytest.fixture
def resume_stack(tmp_path: Path, redis_server: _stack.EmbeddedRedis) -> Iterator[Stack]:
    # A store with only digits-cnn trained in (shared_store also trains models this test does
    # not use). One thread: on a loaded 2-core machine torch's default two took 168 s, one 14 s.
    store = tmp_path / "store"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        zoo.digits_cnn(open_store(Settings(store_url=store.as_uri())))
    finally:
        torch.set_num_threads(threads)
    # The time limit bounds one attempt; redelivery waits for the visibility timeout after it.
    # 40 s: the job needs ~15 s on a quiet 2-core machine; at 25 s one CI run (2026-11-30, a
    # slow moment of the VM) failed the first attempt before its search had begun.
    yield from running(make_stack(tmp_path, redis_server, {
        "MODELPRESS_STORE_URL": store.as_uri(),
        "MODELPRESS_TASK_TIME_LIMIT_S": "40",
        "MODELPRESS_VISIBILITY_TIMEOUT_S": "41",
    }))


def evaluations(r: redis.Redis, job_id: str) -> dict[str, str]:
    """The search's memoized evaluations (QuantTask prefixes its keys with ``mp:``)."""
    memo: dict[str, str] = r.hgetall(records.memo_key(job_id))
    return {k: v for k, v in memo.items() if k.startswith("mp:")}


def stage(r: redis.Redis, job_id: str) -> str:
    """The stage of the job's last progress write; the job's state where it is no longer running."""
    state, raw = r.hmget(records.job_key(job_id), ["state", "progress"])
    if state not in ("queued", "running"):
        return str(state)
    return str(json.loads(raw)["stage"]) if raw else ""


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (a zombie runs nothing)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_sigkill_mid_search_resumes_from_the_memo(resume_stack: Stack, tmp_path: Path) -> None:
    s = resume_stack
    r = s.redis
    test = datasets.digits("test")
    assert test.labels is not None
    x = np.concatenate([test.inputs["x"].numpy()] * TILES)
    np.savez(tmp_path / "digits.npz", x=x, y=np.concatenate([test.labels.numpy()] * TILES))
    with s.client() as client:
        data = client.datasets.upload(tmp_path / "digits.npz", name="digits test x10")
        spec = MixedPrecisionSpec.model_validate({"model": {"zoo": "digits-cnn"},
                                                  "dataset": {"id": data.id},
                                                  "eval_samples": len(x), **SPEC})
        job = client.jobs.create(spec)
        # Poll Redis directly and often: wait until the search has memoized a few evaluations
        # of its own (counted from the first time the stage reads "search").
        at_search: int | None = None
        t_search = 0.0
        deadline = time.monotonic() + 90
        while True:
            assert time.monotonic() < deadline, "the search never got under way"
            st, n = stage(r, job.id), len(evaluations(r, job.id))
            assert st in ("queued", "load", "baseline", "sensitivity", "search"), (
                f"missed the search (at {st}, {n} in memo; job error: "
                f"{r.hget(records.job_key(job.id), 'error')})")
            if st == "search" and at_search is None:
                at_search, t_search = n, time.monotonic()
            if at_search is not None and n >= at_search + 3:
                break
            time.sleep(0.01)
        w1 = s.workers[0]
        _stack.kill_process(w1)  # SIGKILL to the worker's whole process group
        t_kill = time.monotonic()
        while group_alive(w1.pid):
            time.sleep(0.01)
        # A memo write the dead child had sent sits in Redis's socket buffer (loopback): Redis
        # handles it no later than the loop iteration that answers this PING.
        r.ping()
        before = evaluations(r, job.id)
        stage_at_kill = stage(r, job.id)
        s.start_worker("w2")
        done = client.jobs.wait(job.id, timeout=120)
        waited = time.monotonic() - t_kill
    after = evaluations(r, job.id)

    res = done.result
    assert done.state == "succeeded" and isinstance(res, MixedPrecisionResult), done.error
    assert done.attempts == 2 and [(a.attempt, a.outcome) for a in done.runs] == [
        (1, "lost"), (2, "succeeded")]
    assert stage_at_kill == "search"
    # Nothing lost: every evaluation memoized before the kill is still there, unchanged.
    lost = {k for k in before if after.get(k) != before[k]}
    assert not lost
    # Nothing redone: a recomputed value would have changed (each names its worker and run).
    # Everything new was computed on w2 once: by attempt 2, or by a baseline search the lost
    # attempt had offered as a piece, which w2 took from the queue before the job came back.
    new = {k: json.loads(v) for k, v in after.items() if k not in before}
    assert all(str(v["by"]).startswith("w2@") for v in new.values()), new
    by_attempt = {a: sum(int(v["attempt"]) == a for v in new.values()) for a in (1, 2)}
    assert res.evaluations == by_attempt[2] and sum(by_attempt.values()) == len(new)
    assert 0 < res.evaluations < len(after)
    # The finished job's memo is not kept forever: Redis drops it a day after the end.
    assert 0 < r.ttl(records.memo_key(job.id)) <= 86_400
    measured.append(
        f"search resume: SIGKILL {t_kill - t_search:.2f} s into the search with {len(before)} "
        f"evaluations memoized (>= {len(before) - (at_search or 0)} of them in the search); attempt 2 "
        f"computed {res.evaluations} of {len(after)}, the lost attempt's pieces {by_attempt[1]}, "
        f"lost {len(lost)}; "
        f"attempts {done.attempts}, redelivered and finished {waited:.1f} s after the kill")
