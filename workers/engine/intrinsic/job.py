"""The ``intrinsic_dimension`` job."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict

import torch
from torch import nn

from app.schemas import CurvePoint, IntrinsicDimensionResult, IntrinsicDimensionSpec
from workers.engine import datasets, env
from workers.engine.context import JobContext
from workers.engine.intrinsic import search as idsearch
from workers.engine.intrinsic.subspace import (
    Artifact,
    ModelFactory,
    SubspaceRun,
    evaluate,
    rebuild,
    train_full,
    train_subspace,
)
from workers.engine.zoo import DigitsCNN

DEFAULT_GRID = [*range(10, 101, 10), *range(150, 1001, 50), *range(1250, 3001, 250)]


def digits_mlp() -> nn.Module:
    """The paper's MNIST MLP shape (784-200-200-10) on 8x8 digits: 64-200-200-10."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 200), nn.ReLU(), nn.Linear(200, 200),
                         nn.ReLU(), nn.Linear(200, 10))


FACTORIES: dict[str, ModelFactory] = {"digits-mlp": digits_mlp, "digits-cnn": DigitsCNN}


def run(spec: IntrinsicDimensionSpec, ctx: JobContext) -> IntrinsicDimensionResult:
    t0 = time.perf_counter()
    factory = FACTORIES[spec.model]
    tr, te = datasets.digits("train"), datasets.digits("test")
    assert tr.labels is not None and te.labels is not None
    train, test = (tr.inputs["x"], tr.labels), (te.inputs["x"], te.labels)
    grid = spec.grid or DEFAULT_GRID
    ctx.progress("baseline", 0.02, f"training the full {spec.model}")
    full = train_full(factory, train, test, spec.epochs, min(spec.lr, 1e-3), spec.seeds[0])
    target = spec.threshold * full
    n_params = sum(p.numel() for p in factory().parameters())
    ctx.log.info("full %s: accuracy %.4f, D=%d; target %.4f", spec.model, full, n_params, target)
    curve: list[CurvePoint] = []
    best: dict[int, dict[int, SubspaceRun]] = {}
    per_seed: list[int | None] = []
    total = 0
    for k, seed in enumerate(spec.seeds):
        runs: dict[int, SubspaceRun] = {}

        def one(d: int, seed: int = seed, runs: dict[int, SubspaceRun] = runs, k: int = k
                ) -> float:
            ctx.progress("search", 0.05 + 0.85 * (k + min(len(runs), 12) / 12) / len(spec.seeds),
                         f"seed {seed}: training in a {d}-dimensional subspace")
            r = train_subspace(factory, d, spec.projection, train, test, spec.epochs, spec.lr,
                               theta0_seed=seed, projection_seed=seed + 1_000_003,
                               check=ctx.check_cancelled)
            runs[d] = r
            ctx.log.info("seed %d d=%d: accuracy %.4f (%.1f s)", seed, d, r.accuracy, r.seconds)
            return r.accuracy

        how = idsearch.gallop_bisect if spec.search == "bisection" else idsearch.grid_sweep
        res = how(one, grid, target)
        per_seed.append(res.d_int)
        total += len(runs)
        best[seed] = runs
        curve += [CurvePoint(d=d, seed=seed, accuracy=r.accuracy) for d, r in sorted(runs.items())]
    found = [d for d in per_seed if d is not None]
    d_int = int(statistics.median(found)) if found else None

    rebuilt_acc = ratio = None
    seed0 = spec.seeds[0]
    if per_seed[0] is not None:
        run0 = best[seed0][per_seed[0]]
        art = Artifact(model=spec.model, theta0_seed=seed0, projection=spec.projection,
                       projection_seed=seed0 + 1_000_003, D=n_params, d=run0.d,
                       d_vector_b64=Artifact.pack(run0.d_vector))
        model = rebuild(art, factory)
        rebuilt_acc = evaluate(model, None, *test)
        ratio = (4 * n_params) / art.stored_bytes()
        ctx.save_artifact("intrinsic.json", json.dumps(asdict(art)).encode(), "application/json")
    result = IntrinsicDimensionResult(
        model=spec.model, projection=spec.projection, parameters=n_params, full_accuracy=full,
        target=target, d_int90=d_int, d_int90_per_seed=per_seed, curve=curve,
        training_runs=total, rebuilt_accuracy=rebuilt_acc, compression_ratio=ratio,
        seconds=time.perf_counter() - t0,
        method=(f"Adam on d ({spec.epochs} epochs, lr {spec.lr}, batch 64) on digits train, "
                f"accuracy on digits test; full baseline Adam lr {min(spec.lr, 1e-3)}; "
                f"{spec.search} over {len(grid)} grid values"),
        environment=env.environment(torch.device("cpu")))
    ctx.save_artifact("curve.json", json.dumps([c.model_dump() for c in curve]).encode(),
                      "application/json")
    ctx.progress("done", 1.0, f"d_int90 = {d_int} of D = {n_params}")
    return result
