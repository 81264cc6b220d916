"""The ``intrinsic_dimension`` job.

Training runs are the cost, and runs of different seeds (or, for the grid sweep, every grid
point) are independent: the job fans them out to idle workers as pieces (``run_item``). Every
run is memoized under a claim (``compute_once``), so whichever worker gets to a run first
computes it, the others reuse it, and a crashed worker's runs are redone by the next to ask.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import psutil
import torch
from torch import nn

from app.schemas import CurvePoint, IntrinsicDimensionResult, IntrinsicDimensionSpec, ModelRef
from workers.engine import datasets, env, models
from workers.engine.context import JobContext, UserError, compute_once, inputs_at_fault
from workers.engine.intrinsic import search as idsearch
from workers.engine.intrinsic.projections import Kind, memory_bytes
from workers.engine.intrinsic.subspace import (
    Artifact,
    ModelFactory,
    SubspaceRun,
    evaluate,
    pack_tensor,
    rebuild,
    reinit_factory,
    reset_coverage,
    train_full,
    train_subspace,
    unpack_floats,
    unpack_tensor,
)
from workers.engine.zoo import DigitsCNN

DEFAULT_GRID = [*range(10, 101, 10), *range(150, 1001, 50), *range(1250, 3001, 250)]


def digits_mlp() -> nn.Module:
    """The paper's MNIST MLP shape (784-200-200-10) on 8x8 digits: 64-200-200-10."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 200), nn.ReLU(), nn.Linear(200, 200),
                         nn.ReLU(), nn.Linear(200, 10))


FACTORIES: dict[str, ModelFactory] = {"digits-mlp": digits_mlp, "digits-cnn": DigitsCNN}


Split = tuple[tuple[torch.Tensor, ...], torch.Tensor]
Problem = tuple[str, ModelFactory, Split, Split, int | None]


def _problem(spec: IntrinsicDimensionSpec, ctx: JobContext, report: bool = True) -> Problem:
    """(name, factory, train, test, re-initialized parameter count for uploads)."""
    if not isinstance(spec.model, ModelRef):
        tr, te = datasets.digits("train"), datasets.digits("test")
        assert tr.labels is not None and te.labels is not None
        return (spec.model, FACTORIES[spec.model], ((tr.inputs["x"],), tr.labels),
                ((te.inputs["x"],), te.labels), None)
    assert spec.dataset is not None
    if report:
        ctx.progress("load", 0.01, f"loading {spec.model.label()}")
    loaded = models.load_model(spec.model, ctx)
    data = models.load_dataset(spec.dataset, ctx, loaded)
    if data.labels is None:
        raise UserError("intrinsic dimension measures accuracy: the dataset needs labels (`y`)")
    n = len(data)
    if n < 10:
        raise UserError(f"the dataset has {n} samples; at least 10 are needed (80% train, "
                        "20% test)")
    cut = int(n * 0.8)
    xs = data.ordered(loaded.input_names)
    # the largest batch the trainers run (evaluation's 256; training takes 64), so a program
    # exported for a fixed or bounded batch fails here with advice, not mid-training
    with torch.no_grad(), inputs_at_fault("the model does not run on the dataset's inputs",
                                          exported_for=loaded.info.get("inputs")):
        out = loaded.module(*(t[:min(256, n)] for t in xs))
    if (not isinstance(out, torch.Tensor) or out.dim() != 2
            or loaded.task != "classification"):
        got = ("pooled embeddings" if loaded.task == "embedding" and isinstance(out, torch.Tensor)
               and out.dim() == 2 else getattr(out, "shape", type(out).__name__))
        raise UserError("intrinsic dimension needs a classifier: the model must return logits "
                        f"[batch, classes], got {got}")
    datasets.check_class_labels(data.labels, out, n, skip_ignored=False)  # out: [batch, C]
    covered, total = reset_coverage(loaded.module)
    if covered == 0:
        raise UserError("no layer of this model can be re-initialized (theta0 would be the "
                        "trained weights): intrinsic dimension needs Linear or Conv layers")
    ctx.log.info("%s: %d of %d parameters re-initialized for theta0; the rest keep their "
                 "uploaded values", loaded.name, covered, total)
    return (loaded.name, reinit_factory(loaded.module),
            (tuple(t[:cut] for t in xs), data.labels[:cut]),
            (tuple(t[cut:] for t in xs), data.labels[cut:]), covered)


def _point(spec: IntrinsicDimensionSpec, ctx: JobContext, prob: Problem, seed: int, d: int,
           device: torch.device, wait: bool = True) -> tuple[SubspaceRun, str] | None:
    """One training run (seed, d), computed once across the job's workers; and who ran it."""
    _, factory, train, test, _ = prob

    def compute() -> dict[str, Any]:
        r = train_subspace(factory, d, spec.projection, train, test, spec.epochs, spec.lr,
                           theta0_seed=seed, projection_seed=seed + 1_000_003,
                           check=ctx.check_cancelled, layer_scaling=spec.layer_scaling,
                           device=device)
        ctx.log.info("seed %d d=%d: accuracy %.4f (%.1f s on %s)", seed, d, r.accuracy,
                     r.seconds, device.type)
        scales = None if r.layer_scales is None else Artifact.pack(r.layer_scales)
        return {"accuracy": r.accuracy, "d_vector": Artifact.pack(r.d_vector),
                "layer_scales": scales, "seconds": r.seconds, "steps": r.steps,
                "buffers": _packed(r.buffers)}

    v = compute_once(ctx, f"intrinsic:{seed}:{d}", compute, wait=wait)
    if v is None:
        return None
    scales = None if v["layer_scales"] is None else unpack_floats(v["layer_scales"])
    buffers = v.get("buffers")  # absent from runs memoized before buffers were kept
    return SubspaceRun(d, v["accuracy"], unpack_floats(v["d_vector"]), v["seconds"], v["steps"],
                       scales, None if buffers is None
                       else {n: unpack_tensor(b) for n, b in buffers.items()}), str(v["by"])


def _packed(buffers: dict[str, torch.Tensor] | None) -> dict[str, dict[str, Any]] | None:
    return None if buffers is None else {n: pack_tensor(b) for n, b in buffers.items()}


def majority_d(per_seed: list[int | None]) -> int | None:
    """The d that more than half of the seeds reach: the upper median, with a seed that never
    passed counted as infinite (so always a grid value that was trained, never the mean of two;
    None unless more than half passed)."""
    d = statistics.median_high([math.inf if x is None else x for x in per_seed])
    return None if d == math.inf else int(d)


def _search(spec: IntrinsicDimensionSpec, grid: list[int], target: float,
            one: Callable[[int], float]) -> idsearch.SearchResult:
    how = idsearch.gallop_bisect if spec.search == "bisection" else idsearch.grid_sweep
    return how(one, grid, target)


def grid_for(spec: IntrinsicDimensionSpec, n_params: int) -> list[int]:
    """The d values to search: a subspace as large as the model (d = D) compresses nothing, one
    larger is not a subspace. A given grid with such values is refused; the default one is cut
    at D."""
    if spec.grid:
        over = [d for d in spec.grid if d > n_params]
        if over:
            raise UserError(f"grid values {over[:5]}{'...' if len(over) > 5 else ''} exceed the "
                            f"model's {n_params:,} parameters (D): a subspace has at most D "
                            "dimensions; give values up to D")
        return list(spec.grid)
    grid = [d for d in DEFAULT_GRID if d <= n_params]
    if not grid:
        raise UserError(f"the model has {n_params} parameters, fewer than the default grid's "
                        f"smallest d ({DEFAULT_GRID[0]}); give a `grid` of values up to "
                        f"{n_params}")
    return grid


def run_item(spec: IntrinsicDimensionSpec, ctx: JobContext, item: dict[str, Any]) -> None:
    """A piece fanned out by :func:`run`: one grid point, or one seed's whole search."""
    device = env.resolve_device(spec.device)
    prob = _problem(spec, ctx, report=False)
    seed = int(item["seed"])
    if "d" in item:
        _point(spec, ctx, prob, seed, int(item["d"]), device, wait=False)
        return

    def one(d: int) -> float:
        out = _point(spec, ctx, prob, seed, d, device)
        assert out is not None
        return out[0].accuracy

    n_params = sum(p.numel() for p in prob[1]().parameters())
    _search(spec, grid_for(spec, n_params), float(item["target"]), one)


# A sparse projection draws one permutation of all D parameters per column, in Python-level
# steps: D x d = 55,210 x 20,000 (1.1e9) took 46 s on a 2-core EPYC, and it is drawn again for
# every training run; this bound keeps a draw under a minute (the default grid on digits-cnn,
# 315,402 x 3,000, is within it).
SPARSE_DRAW_LIMIT = 2**30


def _check_projection_fits(kind: Kind, D: int, d: int, device: torch.device) -> None:
    """A dense or sparse projection to the grid's largest d must fit in this worker's free memory
    (a dense one of digits-cnn's 315,402 parameters to d = 20,000 needs 50 GB); it is drawn on
    the CPU, and on a GPU run it must fit there too. A sparse one must also be quick to draw."""
    if kind == "sparse" and D * d > SPARSE_DRAW_LIMIT:
        raise UserError(
            f"a sparse projection of D = {D:,} parameters to d = {d:,} draws a permutation of "
            f"all D for each column: D x d = {D * d:.2e}, over the {SPARSE_DRAW_LIMIT:.2e} that "
            "keeps a draw under a minute (it is drawn for every training run): use projection "
            "'fastfood' (time ~ D log d) or a grid with smaller d")
    need = memory_bytes(kind, D, d)
    free = [("this worker", psutil.virtual_memory().available)]
    if device.type == "cuda":
        free.append(("its GPU", torch.cuda.mem_get_info(device)[0]))
    for where, avail in free:
        if need > avail:
            raise UserError(
                f"a {kind} projection of D = {D:,} parameters to d = {d:,} needs about "
                f"{need / 2**30:.1f} GiB, more than the {avail / 2**30:.1f} GiB {where} has "
                "free: use projection 'fastfood' (memory ~ D) or a grid with smaller d")


def run(spec: IntrinsicDimensionSpec, ctx: JobContext) -> IntrinsicDimensionResult:
    t0 = time.perf_counter()
    device = env.resolve_device(spec.device)
    prob = _problem(spec, ctx)
    name, factory, train, test, reinitialized = prob
    n_params = sum(p.numel() for p in factory().parameters())
    grid = grid_for(spec, n_params)
    _check_projection_fits(spec.projection, n_params, max(grid), device)  # before any training
    ctx.progress("baseline", 0.02, f"training the full {name} on {device.type}")
    full = train_full(factory, train, test, spec.epochs, min(spec.lr, 1e-3), spec.seeds[0],
                      device=device)
    target = spec.threshold * full
    ctx.log.info("full %s: accuracy %.4f, D=%d; target %.4f", name, full, n_params, target)
    # Independent pieces for idle workers, last first: this worker starts from the front.
    if spec.fan_out:
        items: list[dict[str, Any]] = (
            [{"seed": sd, "d": d} for sd in spec.seeds for d in grid] if spec.search == "grid"
            else [{"seed": sd, "target": target} for sd in spec.seeds[1:]])
        sent = ctx.fan_out(items[::-1])
        if sent:
            ctx.log.info("offered %d independent pieces to other workers", sent)
    curve: list[CurvePoint] = []
    best: dict[int, dict[int, SubspaceRun]] = {}
    per_seed: list[int | None] = []
    computed_by: dict[str, int] = {}
    total = 0
    for k, seed in enumerate(spec.seeds):
        runs: dict[int, SubspaceRun] = {}

        def one(d: int, seed: int = seed, runs: dict[int, SubspaceRun] = runs, k: int = k
                ) -> float:
            ctx.progress("search", 0.05 + 0.85 * (k + min(len(runs), 12) / 12) / len(spec.seeds),
                         f"seed {seed}: training in a {d}-dimensional subspace")
            out = _point(spec, ctx, prob, seed, d, device)
            assert out is not None
            runs[d], by = out
            computed_by[by] = computed_by.get(by, 0) + 1
            return runs[d].accuracy

        res = _search(spec, grid, target, one)
        per_seed.append(res.d_int)
        total += len(runs)
        best[seed] = runs
        curve += [CurvePoint(d=d, seed=seed, accuracy=r.accuracy) for d, r in sorted(runs.items())]
    d_int = majority_d(per_seed)

    rebuilt_acc = ratio = None
    seed0 = spec.seeds[0]
    if per_seed[0] is not None:
        run0 = best[seed0][per_seed[0]]
        art = Artifact(model=name, theta0_seed=seed0, projection=spec.projection,
                       projection_seed=seed0 + 1_000_003, D=n_params, d=run0.d,
                       d_vector_b64=Artifact.pack(run0.d_vector),
                       layer_scales_b64=(None if run0.layer_scales is None
                                         else Artifact.pack(run0.layer_scales)),
                       buffers=_packed(run0.buffers))
        model = rebuild(art, factory)
        rebuilt_acc = evaluate(model, None, *test)
        ratio = (4 * n_params) / art.stored_bytes()
        ctx.save_artifact("intrinsic.json", json.dumps(asdict(art)).encode(), "application/json")
    result = IntrinsicDimensionResult(
        model=name, projection=spec.projection, parameters=n_params, full_accuracy=full,
        target=target, d_int90=d_int, d_int90_per_seed=per_seed, curve=curve,
        training_runs=total, computed_by=computed_by, layer_scaling=spec.layer_scaling,
        reinitialized_parameters=reinitialized, rebuilt_accuracy=rebuilt_acc,
        compression_ratio=ratio,
        seconds=time.perf_counter() - t0,
        method=(f"Adam on d ({spec.epochs} epochs, lr {spec.lr}, batch 64) on "
                f"{'digits train' if reinitialized is None else 'the first 80% of the dataset'}"
                f", accuracy on {'digits test' if reinitialized is None else 'the last 20%'}; "
                f"full baseline Adam lr {min(spec.lr, 1e-3)}; "
                f"{spec.search} over {len(grid)} grid values"),
        environment=env.environment(device))
    ctx.save_artifact("curve.json", json.dumps([c.model_dump() for c in curve]).encode(),
                      "application/json")
    ctx.progress("done", 1.0, f"d_int90 = {d_int} of D = {n_params}")
    return result
