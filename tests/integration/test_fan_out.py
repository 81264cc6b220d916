"""Fan-out: a job's independent pieces (intrinsic-dimension training runs, mixed-precision
inter-layer terms, baseline searches and frontier re-measurements) computed by several real
Celery workers, each exactly once, and a piece whose worker died is computed by the next to ask
(claims expire)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app import records
from app.config import Settings
from app.schemas import (
    IntrinsicDimensionResult,
    IntrinsicDimensionSpec,
    MixedPrecisionResult,
    MixedPrecisionSpec,
    SensitivityOptions,
    SensitivityResult,
    SensitivitySpec,
)
from app.storage import open_store
from modelpress import _stack
from tests.conftest import Stack, fresh_db, make_stack, running
from workers.engine.context import LocalContext, compute_once
from workers.engine.quant.formats import from_json
from workers.engine.quant.prepare import build_task
from workers.engine.quant.sensitivity import dependency_terms
from workers.runner import WorkerContext

pytestmark = pytest.mark.slow


@pytest.fixture
def two_workers(tmp_path: Path, redis_server: _stack.EmbeddedRedis,
                shared_store: Path) -> Iterator[Stack]:
    yield from running(make_stack(tmp_path, redis_server,
                                  {"MODELPRESS_STORE_URL": shared_store.as_uri()}),
                       workers=("w1", "w2"))


def test_grid_points_are_shared_by_two_workers_each_once(two_workers: Stack) -> None:
    s = two_workers
    grid, seeds = [10, 40, 150, 500, 1500], [0, 1]
    with s.client() as client:
        job = client.jobs.create(IntrinsicDimensionSpec(search="grid", grid=grid, seeds=seeds,
                                                        epochs=2))
        done = client.jobs.wait(job.id, timeout=300)
    res = done.result
    assert isinstance(res, IntrinsicDimensionResult), done.error
    assert res.training_runs == len(grid) * len(seeds) == sum(res.computed_by.values())
    assert len(res.computed_by) == 2, res.computed_by  # both workers trained some
    assert {w.split("@")[0] for w in res.computed_by} == {"w1", "w2"}
    # Exactly one memoized run per (seed, d): nothing computed twice, nothing missing.
    memo = s.redis.hgetall(records.memo_key(job.id))
    runs = {k for k in memo if k.startswith("intrinsic:")}
    assert runs == {f"intrinsic:{sd}:{d}" for sd in seeds for d in grid}
    assert done.attempts == 1


def test_mixed_precision_pieces_are_shared_by_two_workers_each_once(
        two_workers: Stack, shared_store: Path, tmp_path: Path) -> None:
    """The job offers its inter-layer terms (before its Hessian probes) and its baseline
    searches (before its own search) to the idle worker: both compute evaluations, every
    memoized value is one the job used, and the terms the other worker computed are the ones
    the job's formats give."""
    s = two_workers
    spec = MixedPrecisionSpec.model_validate({
        "model": {"zoo": "digits-cnn"}, "baselines": ["hessian", "random", "greedy"],
        "sensitivity": {"probes": 128}, "repeats": 5, "warmup": 1, "frontier_points": 3})
    with s.client() as client:
        job = client.jobs.create(spec)
        done = client.jobs.wait(job.id, timeout=300)
    res = done.result
    assert isinstance(res, MixedPrecisionResult), done.error
    memo = s.redis.hgetall(records.memo_key(job.id))
    values = {k: json.loads(v) for k, v in memo.items() if k.startswith("mp:")}
    assert all(v["attempt"] == 1 for v in values.values())
    assert res.evaluations == len(values) == sum(res.computed_by.values())
    assert Counter(str(v["by"]) for v in values.values()) == res.computed_by
    assert {w.split("@")[0] for w in res.computed_by} == {"w1", "w2"}, res.computed_by
    # Every frontier point re-measured on ONNX Runtime once, in this run, by whichever worker
    # took it; then the stage ended before the timing.
    deployed = {k: json.loads(v) for k, v in memo.items() if k.startswith("mpd:")}
    assert len(deployed) == len(res.frontier) and all(v["attempt"] == 1 for v in deployed.values())
    assert sorted(v["v"] for v in deployed.values()) == sorted(
        p.deployed_metric or 0.0 for p in res.frontier)
    plan = json.loads(memo["mp-frontier:1"])  # offered to the idle worker, which took it
    assert len(plan["configs"]) == len(res.frontier) and set(plan["keys"]) >= set(deployed)
    assert json.loads(memo["mp-phase:1"]) == "done"
    # The plan the pieces read, and the terms recomputed here in one process from it.
    levels = json.loads(memo["mp-levels:1"])["levels"]
    first = next(iter(levels))
    fmt_of = {n: from_json(f) for n, f in levels[first].items()}
    ctx = LocalContext(tmp_path / "local", store=open_store(Settings(store_url=shared_store.as_uri())))
    _, task = build_task(spec.model, None, None, spec.eval_samples,
                         spec.sensitivity.calibration_samples, ctx)
    want = dependency_terms(task, list(fmt_of), fmt_of, prefix_replay=False)
    got = {row.name: row.dependency_term for row in res.sensitivity}
    assert got.keys() == want.keys()
    for name, v in want.items():
        assert got[name] == pytest.approx(v, rel=1e-4, abs=1e-6), name

    # A sensitivity job offers its terms the same way, before its 512 Hessian probes.
    with s.client() as client:
        job = client.jobs.create(SensitivitySpec(model=spec.model, precision="int8",
                                                 options=SensitivityOptions(probes=512)))
        done = client.jobs.wait(job.id, timeout=300)
    sens = done.result
    assert isinstance(sens, SensitivityResult), done.error
    others = set(sens.computed_by) - {done.runs[0].worker}
    assert others and sens.evaluations == sum(sens.computed_by.values()) == 1 + len(sens.layers)


def test_a_dead_workers_claim_expires_and_the_piece_is_computed(
        tmp_path: Path, redis_server: _stack.EmbeddedRedis) -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/{fresh_db()}",
                        worker_heartbeat_s=1, store_url=tmp_path.as_uri())
    r = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    r.flushdb()
    r.hset(records.job_key("job_x"), mapping={"state": "running", "attempts": "1"})
    ctx = WorkerContext("job_x", "t", 1, settings, r, open_store(settings), tmp_path, who="w9")
    # Another worker claimed the piece and then died: its claim is never renewed.
    claim = f"{records.memo_key('job_x')}:claim:piece"
    r.set(claim, "dead-worker", ex=3)
    calls: list[float] = []
    out: list[dict[str, object] | None] = []
    t0 = time.monotonic()
    worker = threading.Thread(target=lambda: out.append(compute_once(
        ctx, "piece", lambda: calls.append(time.monotonic()) or {"v": 42}, poll_s=0.2)))
    worker.start()
    worker.join(timeout=20)
    assert out == [{"v": 42, "by": "w9"}] and len(calls) == 1
    assert 2.0 <= calls[0] - t0 <= 6.0  # waited for the dead claim to expire, then computed
    assert compute_once(ctx, "piece", lambda: {"v": 0}) == {"v": 42, "by": "w9"}  # memoized
    assert r.get(claim) is None  # released after computing
    # While a live holder renews its claim, others wait rather than compute it again.
    with ctx.claim("other") as mine:
        assert mine
        other = WorkerContext("job_x", "t", 1, settings, r, open_store(settings), tmp_path)
        assert compute_once(other, "other", lambda: {"v": 1}, wait=False) is None
        time.sleep(3.5)  # longer than the TTL: renewal keeps it
        with other.claim("other") as theirs:
            assert not theirs
