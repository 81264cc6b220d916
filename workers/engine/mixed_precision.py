"""The ``mixed_precision`` and ``sensitivity`` jobs.

Stages: load -> baseline -> sensitivity (Hessian trace x perturbation + inter-layer term) ->
search (bisection along the augmented ordering, plus the baselines asked for) -> recovery
(optional: LoRA adapters trained per config, bisection on the recovered metric) -> frontier
(realize each candidate on the backend's real kernels, time it, re-measure its metric on the
deployed model) -> choose (fastest deployed point inside the budget) -> report + artifacts.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from app.schemas import (
    ConfigPoint,
    LayerSensitivity,
    LoraRecoveryReport,
    MixedPrecisionResult,
    MixedPrecisionSpec,
    SearchRun,
    SensitivityOptions,
    SensitivityResult,
    SensitivitySpec,
)
from workers.engine import env, models, timing
from workers.engine.backends import onnxruntime_cpu as ortb
from workers.engine.backends import torch_runtime
from workers.engine.backends.base import Backend, Deployed, interleaved_latency, run_batched
from workers.engine.context import JobContext, UserError, compute_once, memo_key
from workers.engine.quant import fanout
from workers.engine.quant import recovery as qrec
from workers.engine.quant import search as qsearch
from workers.engine.quant import sensitivity as qsens
from workers.engine.quant.formats import LayerFormat, parse
from workers.engine.quant.prepare import build_task
from workers.engine.quant.task import (
    LABELED,
    Config,
    QuantTask,
    check_budget_mode,
    config_json,
    config_key,
    threshold,
)

log = logging.getLogger("modelpress.engine.mixed_precision")
TIE = 0.03  # relative latency difference treated as equal when choosing
GREEDY_MAX = 400  # evaluations the greedy baseline may spend
# The frontier is offered to idle workers from this many candidates on, as this many pieces
# (each walks every candidate, so one idle worker takes all it can; more pieces let more
# workers join, and a piece that finds the stage over returns without loading the model).
FRONTIER_FAN_OUT_MIN = 3
FRONTIER_PIECES = 2
# The stage (fanout phase) during which each kind of piece is useful.
_STAGE_OF = {"terms": "sensitivity", "search": "search", "frontier": "frontier"}


def _to_schema(scores: list[qsens.LayerScore]) -> list[LayerSensitivity]:
    return [LayerSensitivity(**vars(s)) for s in scores]


def _traces(task: QuantTask, names: list[str], opts: SensitivityOptions, ctx: JobContext,
            lo: float, hi: float) -> dict[str, float]:
    return qsens.hessian_traces(
        task, names, opts.probes, opts.calibration_samples, opts.seed,
        on_probe=lambda k: ctx.progress("sensitivity", lo + (hi - lo) * k / opts.probes,
                                        f"Hutchinson probe {k}/{opts.probes}"),
        method=opts.hessian)


def _sensitivity(task: QuantTask, names: list[str], fmt_of: Mapping[str, LayerFormat],
                 opts: SensitivityOptions, ctx: JobContext, lo: float, hi: float,
                 traces: Mapping[str, float] | None = None
                 ) -> tuple[list[qsens.LayerScore], dict[str, float] | None]:
    """Every term per layer. ``traces`` (Tr(H), shared by all levels) are computed here in the
    first half of [lo, hi] when not given; the inter-layer terms take the rest."""
    if traces is None:
        traces = _traces(task, names, opts, ctx, lo, (lo + hi) / 2)
        lo = (lo + hi) / 2
    span = hi - lo
    scores = qsens.hessian_terms(task, names, fmt_of, traces)
    deps = None
    if opts.dependency != "none":
        deps = qsens.dependency_terms(
            task, names, fmt_of,
            on_step=lambda i: ctx.progress("sensitivity", lo + span * i / len(names),
                                           f"inter-layer term {i}/{len(names)}"))
    pairwise = None
    if opts.dependency == "pairwise":
        if len(names) > 12:
            ctx.log.warning("pairwise terms skipped: %d layers (12 at most)", len(names))
        else:
            pairwise = qsens.pairwise_terms(task, names, fmt_of)
    return qsens.combine(scores, deps, opts.dependency_weight, pairwise), pairwise


def run_sensitivity(spec: SensitivitySpec, ctx: JobContext) -> SensitivityResult:
    t0 = time.perf_counter()
    ctx.progress("load", 0.02, f"loading {spec.model.label()}")
    loaded, task = _build(spec, ctx)
    fmt = parse(spec.precision)
    names = list(task.layers)
    fmt_of = {n: fmt for n in names}
    if fmt.is_static:  # the grids come from calibrating the deployed graph
        example = tuple(t[:8] for t in task.eval_inputs)
        exported = ortb.export(task.module, example, loaded.input_names, task.layers)
        exported.set_calibration(task.calib_inputs)
        fmt_of = {n: ortb.native_format(exported, n, fmt) for n in names}
        names = [n for n in names if fmt_of[n].realizable]
        if not names:
            raise UserError("ONNX Runtime's static int8 quantizer kept none of this model's "
                            "layers (no calibrated grids), so there is nothing to score at "
                            "int8-static; score precision \"int8\" (dynamic) instead")
    if spec.fan_out and spec.options.dependency != "none":
        level = {fmt.label(): {n: fmt_of[n] for n in names}}
        fanout.publish_levels(ctx, level, torch.get_num_threads())
        _offer_terms(ctx, level)
    scores, pairwise = _sensitivity(task, names, fmt_of, spec.options, ctx, 0.05, 0.95)
    if spec.fan_out:
        fanout.set_phase(ctx, "done")
    result = SensitivityResult(
        model=loaded.name, precision=fmt.label(), metric=task.metric,
        loss="cross-entropy" if task.metric in LABELED else "squared error to float outputs",
        hessian=qsens.hessian_method(task, spec.options.hessian),
        layers=_to_schema(scores), pairwise=pairwise, evaluations=task.evaluations,
        computed_by=task.computed_by(),
        seconds=time.perf_counter() - t0, environment=env.environment(torch.device("cpu")))
    ctx.save_artifact("sensitivity.json", result.model_dump_json(indent=2).encode(),
                      "application/json")
    ctx.progress("done", 1.0, f"{len(names)} layers scored")
    return result


def run(spec: MixedPrecisionSpec, ctx: JobContext) -> MixedPrecisionResult:
    stages: dict[str, float] = {}
    clock = time.perf_counter()

    def stage_done(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stages[name] = round(now - clock, 3)
        clock = now

    if spec.threads:
        torch.set_num_threads(spec.threads)
    threads = spec.threads or torch.get_num_threads()
    ctx.progress("load", 0.01, f"loading {spec.model.label()}")
    loaded, task = _build(spec, ctx, train_samples=spec.lora.samples if spec.lora else 0)
    hessian = qsens.hessian_method(task, spec.sensitivity.hessian)  # refuse before any work
    check_budget_mode(task.metric, spec.budget.mode)
    example = tuple(t[: spec.batch_size] for t in task.eval_inputs)
    ctx.progress("load", 0.04, "exporting to ONNX" if spec.backend == ortb.NAME
                 else f"preparing {spec.backend}")
    backend = open_backend(spec.backend, task, example, loaded.input_names, threads)
    requested = spec.levels or backend.default_levels(_has_conv(task))
    if spec.lora and "int8-static" in requested:
        raise UserError("LoRA recovery needs dynamic levels (its adapters change the weights "
                        "that static grids are calibrated on): give levels such as "
                        '["int8", "int4"]')
    stage_done("load")

    # Baseline: the float model in simulation and on the backend.
    higher = spec.budget.higher_is_better
    if higher is None:
        higher = task.higher_is_better
    base_metric = task.evaluate({})
    limit = threshold(base_metric, spec.budget.mode, spec.budget.value, higher)  # mode: checked at load
    ctx.log.info("baseline %s = %.6f; budget threshold %.6f", task.metric, base_metric, limit.value)
    stage_done("baseline")

    # Levels: which layers each precision may take on this backend, in its real arithmetic.
    fmt_at: dict[str, dict[str, LayerFormat]] = {}
    prec: str
    for prec in requested:
        if prec == "fp32":
            continue
        fmt_at[prec] = {}
        for name in task.layers:
            fmt = parse(prec, spec.int4_group_size)
            if backend.supports(name, fmt):
                native = backend.native_format(name, fmt)
                if native.realizable:
                    fmt_at[prec][name] = native
        if not fmt_at[prec] and spec.levels:  # a default level that fits nothing just drops
            raise UserError(f"backend {backend.name} runs {prec} on none of this model's "
                            f"layers; choose other levels (see the spec's `levels`)")
    ungated = {p: dict(f) for p, f in fmt_at.items()}
    ctx.progress("baseline", 0.045, "measuring which precisions the backend speeds up")
    gate = _latency_gate(backend, fmt_at, example, spec.warmup, spec.repeats,
                         spec.latency_gate, ctx)
    levels_used = [p for p in fmt_at if fmt_at[p]]
    stage_done("latency_gate")

    # Sensitivity per level (each level's own perturbation and inter-layer terms), on Hessian
    # traces computed once for every layer any level offers.
    scores_at: dict[str, list[qsens.LayerScore]] = {}
    offered = list(dict.fromkeys(n for p in levels_used for n in fmt_at[p]))
    if spec.fan_out and offered:  # what every piece reads: the levels, as gated here
        fanout.publish_levels(ctx, {p: fmt_at[p] for p in levels_used}, threads)
        if spec.sensitivity.dependency != "none":
            _offer_terms(ctx, {p: fmt_at[p] for p in levels_used})
    traces = _traces(task, offered, spec.sensitivity, ctx, 0.05, 0.2) if offered else {}
    span = 0.2 / max(1, len(levels_used))
    for i, prec in enumerate(levels_used):
        names = list(fmt_at[prec])
        scores_at[prec], _ = _sensitivity(task, names, fmt_at[prec], spec.sensitivity, ctx,
                                          0.2 + i * span, 0.2 + (i + 1) * span, traces)
    if spec.fan_out:
        fanout.set_phase(ctx, "done")
    stage_done("sensitivity")

    def levels_for(ordering: str) -> list[tuple[str, qsearch.Level]]:
        out = []
        gen = torch.Generator().manual_seed(spec.sensitivity.seed)
        for prec in levels_used:
            sc = scores_at[prec]
            if ordering == "hessian":
                order = [s.name for s in sorted(sc, key=lambda s: s.hessian_term)]
            elif ordering == "random":
                perm = torch.randperm(len(sc), generator=gen).tolist()
                order = [sc[j].name for j in perm]
            else:
                order = [s.name for s in sorted(sc, key=lambda s: s.score)]
            out.append((prec, qsearch.Level(fmt_at[prec], order)))
        return out

    # Search: ours first, then the baselines asked for (offered to idle workers meanwhile).
    searched = [b for b in spec.baselines if b in ("hessian", "random", "greedy")]
    if spec.fan_out and levels_used and searched:
        orders: fanout.Orders = {
            str(b): [(p, lvl.order) for p, lvl in levels_for("augmented" if b == "greedy" else b)]
            for b in searched}
        fanout.publish_searches(ctx, limit, orders)
        fanout.set_phase(ctx, "search")
        sent = ctx.fan_out([{"part": "search", "ordering": b} for b in searched[::-1]])
        if sent:
            ctx.log.info("offered %d baseline searches to idle workers", sent)
    ctx.progress("search", 0.42, "bisection along the augmented ordering")
    outcomes = [qsearch.bisection_search(task.evaluate, limit, levels_for("augmented"),
                                         "augmented")]
    for b in spec.baselines:
        if b in ("hessian", "random"):
            ctx.progress("search", 0.5, f"baseline: {b} ordering")
            outcomes.append(qsearch.bisection_search(task.evaluate, limit, levels_for(b), b))
        elif b == "greedy":
            ctx.progress("search", 0.5, "baseline: greedy one-by-one")
            outcomes.append(qsearch.greedy_search(task.evaluate, limit, levels_for("augmented"),
                                                  max_evaluations=GREEDY_MAX))
    if spec.fan_out:
        fanout.set_phase(ctx, "done")  # pieces that arrive from now on return at once
    stage_done("search")

    # Recovery: the same ordering, bisected again above our boundary on the metric each config
    # reaches once its adapters are trained.
    recovery: qrec.Recovery | None = None
    recovered: qsearch.SearchOutcome | None = None
    if spec.lora and levels_used:
        assert task.train_inputs is not None
        ctx.progress("recovery", 0.5, f"LoRA recovery: rank {spec.lora.rank}, "
                     f"{spec.lora.steps} steps per config")
        recovery = qrec.Recovery(task, spec.lora, task.train_inputs)
        recovered = qsearch.bisection_search(
            recovery.evaluate, limit, levels_for("augmented"), "augmented+lora",
            floor=outcomes[0].boundaries.get(levels_used[0], 0))
        ctx.log.info("recovered search: boundaries %s (plain %s), %d trainings, %.1f s",
                     recovered.boundaries, outcomes[0].boundaries, recovery.trainings,
                     recovery.seconds)
    stage_done("recovery")

    # Candidates for the frontier: every search result, uniform configs, a sweep of ours, and
    # the recovered search's result (its own key: same layers, other weights).
    candidates: dict[str, tuple[str, Config]] = {}

    def add(label: str, cfg: Config) -> None:
        candidates.setdefault(config_key(cfg), (label, cfg))

    add("fp32", {})
    for o in outcomes:
        add(f"search:{o.ordering}", o.config)
    # The naive baseline: every layer the backend can take, gate or no gate.
    uniform: dict[str, Config] = ({p: dict(f) for p, f in ungated.items() if f}
                                  if "uniform" in spec.baselines else {})
    for prec, cfg in uniform.items():
        add(f"uniform:{prec}", cfg)
    ours = outcomes[0]
    for cfg in qsearch.sweep(levels_for("augmented"), ours.boundaries, spec.frontier_points):
        add("sweep:augmented", cfg)
    lora_key = ""
    if recovered is not None and recovered.config:
        lora_key = "lora:" + config_key(recovered.config)
        candidates[lora_key] = ("search:augmented+lora", recovered.config)

    # Each candidate is realized here (its latency is timed here, below); its re-measurement on
    # the evaluation data, and its simulated metric where the search did not compute it, may
    # come from idle workers: they take the candidates from the back, this worker from the
    # front, each skipping what the other holds, then this worker waits for the rest.
    plain = [k for k in candidates if k != lora_key]
    if spec.fan_out and len(plain) >= FRONTIER_FAN_OUT_MIN:
        configs = [candidates[k][1] for k in plain]
        fanout.publish_frontier(ctx, configs, threads, [
            key for cfg in configs
            for key in (_deployed_key(task, backend, cfg), task.memo_key("metric", cfg))],
            _hardware(backend.name))
        fanout.set_phase(ctx, "frontier")
        sent = ctx.fan_out([{"part": "frontier"} for _ in range(FRONTIER_PIECES)])
        if sent:
            ctx.log.info("offered the frontier's re-measurements to idle workers")
    measured: dict[str, tuple[dict[str, Any], float]] = {}
    models: dict[str, Deployed] = {}
    for i, (key, (_, cfg)) in enumerate(candidates.items()):
        ctx.progress("frontier", 0.55 + 0.3 * i / len(candidates),
                     f"realizing and evaluating {i + 1}/{len(candidates)} on {backend.name}")
        if key == lora_key:
            assert recovery is not None
            # Same graph and kernels, other weights: the model with its adapters merged.
            merged = qrec.merged_copy(task.module, task.layers,
                                      recovery.training(cfg).adapters)
            model = models[key] = backend.rebuilt(merged).realize(cfg)
            measured[key] = (_measure(task, model), recovery.evaluate(cfg))
            continue
        model = models[key] = backend.realize(cfg)
        deployed = _deployed_once(ctx, task, backend, cfg, model, wait=False)
        simulated = task.evaluate_unless_taken(cfg)
        if deployed is not None and simulated is not None:
            measured[key] = (deployed, simulated)
    pending = [k for k in candidates if k not in measured]
    if pending:
        ctx.progress("frontier", 0.85, f"waiting for {len(pending)} re-measurements on other "
                     "workers")
    for key in pending:  # what idle workers were still computing
        cfg, model = candidates[key][1], models[key]
        deployed = _deployed_once(ctx, task, backend, cfg, model, wait=True)
        assert deployed is not None
        measured[key] = (deployed, task.evaluate(cfg))
    if spec.fan_out:
        fanout.set_phase(ctx, "done")  # nothing may take CPU from the timing below
    points: dict[str, ConfigPoint] = {}
    for key, (label, cfg) in candidates.items():
        deployed, simulated = measured[key]
        points[key] = ConfigPoint(
            label=label, config=config_json(cfg), simulated_metric=simulated,
            deployed_metric=deployed["v"], size_bytes=deployed["size"],
            # fp32 is the reference the budget is taken from; on the backend it differs from
            # torch only by float rounding, which must not put it "outside" a tight budget.
            within_budget=limit.ok(deployed["v"]) or not cfg)
    ctx.progress("frontier", 0.86, f"timing {len(models)} configurations, interleaved")
    for key, lat in interleaved_latency(models, example, spec.warmup, spec.repeats).items():
        points[key].latency_ms = statistics.median(lat)
        points[key].latency_p90_ms = timing.p90(lat)
    stage_done("frontier")

    _mark_pareto(list(points.values()), higher)
    base_key = config_key({})
    baseline = points[base_key]
    chosen_key, why = choose_point(points, base_key, higher, limit.value, task.metric)
    chosen = points[chosen_key]
    assert baseline.latency_ms and chosen.latency_ms
    reduction = 1.0 - chosen.latency_ms / baseline.latency_ms

    searches = [SearchRun(ordering=o.ordering, order=o.orders.get(levels_used[0], []) if levels_used
                          else [], boundaries=o.boundaries,
                          result=points[config_key(o.config)], evaluations=o.evaluations,
                          seconds=round(o.seconds, 3)) for o in outcomes]
    lora_report = None
    if recovered is not None and recovery is not None:
        point = points[lora_key] if lora_key else baseline
        searches.append(SearchRun(ordering=recovered.ordering,
                                  order=recovered.orders.get(levels_used[0], []),
                                  boundaries=recovered.boundaries, result=point,
                                  evaluations=recovered.evaluations,
                                  seconds=round(recovered.seconds, 3)))
        lora_report = _lora_report(task, recovery, recovered.config, points[config_key(ours.config)],
                                   point)
        if lora_key:
            ctx.save_artifact("lora.safetensors", _adapters_bytes(
                recovery.training(recovered.config).adapters), "application/octet-stream")
    for prec, cfg in uniform.items():
        searches.append(SearchRun(ordering=f"uniform:{prec}", order=list(cfg),
                                  boundaries={prec: len(cfg)}, result=points[config_key(cfg)],
                                  evaluations=1, seconds=0.0))
    sens = _to_schema(scores_at[levels_used[0]]) if levels_used else []
    result = MixedPrecisionResult(
        model=loaded.name, backend=backend.name, metric=task.metric, higher_is_better=higher,
        budget=spec.budget, threshold=limit.value, baseline=baseline, chosen=chosen, why=why,
        frontier=sorted(points.values(), key=lambda p: p.latency_ms or 0.0), searches=searches,
        sensitivity=sens, evaluations=task.evaluations, computed_by=task.computed_by(),
        stage_seconds=stages, latency_gate=gate,
        latency_reduction=reduction, levels=[p for p in fmt_at if ungated[p]], lora=lora_report,
        method=(f"search in simulated quantization matching {backend.name}'s arithmetic on "
                f"{len(task.eval_inputs[0])} evaluation samples; every frontier point realized "
                f"with {backend.describe()}, its metric re-measured on the deployed "
                f"model and its latency timed at batch {len(example[0])} ({spec.warmup} warm-up, "
                f"{spec.repeats} runs, median, {threads} threads)"),
        hessian=hessian if offered else "none (no layer offered)",
        environment=env.environment(backend.device),
    )
    name, blob = models[chosen_key].artifact()
    ctx.save_artifact(name, blob, "application/octet-stream")
    ctx.save_artifact("report.json", result.model_dump_json(indent=2).encode(), "application/json")
    ctx.save_artifact("config.json", json.dumps(chosen.config, indent=2).encode(),
                      "application/json")
    ctx.progress("done", 1.0, f"{chosen.label}: {task.metric} {chosen.deployed_metric:.4f}, "
                 f"{chosen.latency_ms:.3f} ms ({reduction:.1%} faster than fp32)")
    return result


def _build(spec: MixedPrecisionSpec | SensitivitySpec, ctx: JobContext, train_samples: int = 0
           ) -> tuple[models.LoadedModel, QuantTask]:
    if isinstance(spec, SensitivitySpec):
        return build_task(spec.model, spec.dataset, spec.metric, spec.eval_samples,
                          spec.options.calibration_samples, ctx)
    return build_task(spec.model, spec.dataset, spec.budget.metric, spec.eval_samples,
                      spec.sensitivity.calibration_samples, ctx, train_samples=train_samples)


def _offer_terms(ctx: JobContext, fmt_at: Mapping[str, Mapping[str, LayerFormat]]) -> None:
    """Offer the inter-layer terms of the published levels to idle workers (before the
    Hessian traces, so the pieces run while this worker computes those)."""
    fanout.set_phase(ctx, "sensitivity")
    sent = ctx.fan_out(fanout.term_items({p: list(f) for p, f in fmt_at.items()}))
    if sent:
        ctx.log.info("offered %d pieces of inter-layer terms to idle workers", sent)


def run_item(spec: MixedPrecisionSpec | SensitivitySpec, ctx: JobContext, item: dict[str, Any]
             ) -> None:
    """A piece offered by :func:`run` or :func:`run_sensitivity`: some layers' inter-layer
    terms, one baseline search, or the frontier's candidates from the back. Its values land in
    the job's memo (``fanout``)."""
    part = str(item["part"])
    wanted = _STAGE_OF[part]
    if fanout.phase(ctx) != wanted:
        ctx.log.info("piece %s arrived after its stage; nothing to do", part)
        return
    if part == "frontier":
        assert isinstance(spec, MixedPrecisionSpec)
        _frontier_piece(spec, ctx)
        return
    plan = fanout.levels(ctx)
    assert plan is not None  # published before any phase is set
    fmt_at, threads = plan
    torch.set_num_threads(threads)
    _, task = _build(spec, ctx)
    if fanout.phase(ctx) != wanted:  # the job moved on while the model loaded
        return
    if part == "terms":
        fmt_of = fmt_at[str(item["level"])]
        qsens.dependency_terms(task, list(fmt_of), fmt_of, restore=list(item["layers"]),
                               wait=False)
        return
    searches = fanout.searches(ctx)
    assert searches is not None  # published before the phase
    limit, orders = searches
    ordering = str(item["ordering"])
    levels = [(p, qsearch.Level(fmt_at[p], order)) for p, order in orders[ordering]]
    if ordering == "greedy":
        qsearch.greedy_search(task.evaluate, limit, levels, max_evaluations=GREEDY_MAX)
    else:
        qsearch.bisection_search(task.evaluate, limit, levels, ordering)


def _measure(task: QuantTask, model: Deployed) -> dict[str, Any]:
    """A realized model's metric on the evaluation data, and its size."""
    outs = torch.from_numpy(run_batched(model, task.eval_inputs, task.batch_size))
    return {"v": task.score(outs), "size": model.size_bytes}


def _hardware(backend: str) -> str:
    """What a re-measurement on ``backend`` depends on besides the config: the device, and on
    x86 whether int8 GEMMs need reduced ranges (no VNNI: another realized model)."""
    device = torch.device("cuda" if backend.endswith("cuda") else "cpu")
    return f"{env.device_name(device)}; reduce_range {env.needs_reduce_range()}"


def _deployed_key(task: QuantTask, backend: Backend, cfg: Config) -> str:
    """Keyed by hardware too: a worker of another kind in the queue measures under its own key,
    which the job never reads, rather than handing the job another model's metric."""
    return "mpd:" + memo_key(backend.name, _hardware(backend.name),
                             task.memo_key("deployed", cfg))


def _deployed_once(ctx: JobContext, task: QuantTask, backend: Backend, cfg: Config,
                   model: Deployed | None, wait: bool) -> dict[str, Any] | None:
    """``cfg`` re-measured on the backend (``model``, or realized here when it is needed),
    computed once across the job's workers (None where another one is measuring it, unless
    ``wait``). Memoized apart from the simulated values (``mpd:``): they are not evaluations
    of the search."""
    key = _deployed_key(task, backend, cfg)

    def measure() -> dict[str, Any]:
        ctx.check_cancelled()  # a piece of a cancelled or lost run stops here
        realized = model if model is not None else backend.realize(cfg)
        return {**_measure(task, realized), "attempt": ctx.attempt}

    return compute_once(ctx, key, measure, wait=wait)


def _frontier_piece(spec: MixedPrecisionSpec, ctx: JobContext) -> None:
    """Candidates of the frontier from the back: their re-measurement on the backend and their
    simulated metric, each unless another worker holds it."""
    plan = fanout.frontier(ctx)
    assert plan is not None  # published before the phase
    configs, threads, keys, hardware = plan
    here = _hardware(spec.backend)
    if hardware != here:
        ctx.log.info("piece frontier: this worker (%s) is not the job's hardware (%s); "
                     "skipped", here, hardware)
        return
    if all(ctx.memo_get(k) is not None for k in keys):  # the job's worker got there first
        return
    torch.set_num_threads(threads)
    loaded, task = _build(spec, ctx)
    example = tuple(t[: spec.batch_size] for t in task.eval_inputs)
    if fanout.phase(ctx) != "frontier":
        return
    backend = open_backend(spec.backend, task, example, loaded.input_names, threads)
    for cfg in reversed(configs):
        ctx.check_cancelled()
        if fanout.phase(ctx) != "frontier":  # the job's worker times from now on: stop
            return
        _deployed_once(ctx, task, backend, cfg, None, wait=False)
        if fanout.phase(ctx) != "frontier":
            return
        task.evaluate_unless_taken(cfg)


def _latency_gate(backend: Backend, fmt_at: dict[str, dict[str, LayerFormat]],
                  example: tuple[torch.Tensor, ...], warmup: int, repeats: int, enforce: bool,
                  ctx: JobContext) -> dict[str, float]:
    """A precision is offered to an op type only if the backend, measured with every such
    layer moved down to it from the level it would replace (fp32 for the first level), runs
    faster (ORT's ConvInteger, for one, is slower than its float convolution on AVX2; torch's
    int8 GEMM with its per-call quantization slower than its bf16 GEMM on AMX). Accuracy search
    alone would happily pick slower configs; this keeps it inside what the real kernels reward.
    Levels are gated in order, each against the model with every layer at the deepest level
    kept for it so far (fp32 where none is; the search descends the same way). Removes what is
    not offered from ``fmt_at``; returns each group's latency relative to its reference."""
    kept: dict[str, LayerFormat] = {}  # each layer at the deepest level kept so far
    gate: dict[str, float] = {}
    for prec, fmts in fmt_at.items():
        groups = _gate_groups(prec, fmts, backend.op_of)
        if not groups:
            continue
        models = {"reference": backend.realize(kept)}
        models |= {k: backend.realize({**kept, **g}) for k, g in groups.items()}
        ms = {k: statistics.median(v)
              for k, v in interleaved_latency(models, example, warmup, repeats).items()}
        del models
        ref = ms["reference"]
        for gkey, group in groups.items():
            gate[gkey] = round(ms[gkey] / ref, 4)
            if ms[gkey] >= ref and enforce:
                ctx.log.info("%s measured %.3f ms vs %.3f ms at the level above: not offered",
                             gkey, ms[gkey], ref)
                for n in group:
                    del fmts[n]
        kept |= fmts
    return gate


def _gate_groups(prec: str, fmts: Mapping[str, LayerFormat], op_of: Mapping[str, str]
                 ) -> dict[str, dict[str, LayerFormat]]:
    """The layers timed together: one group per op type, except that static int8 layers pay
    off in chains (uint8 from one layer to the next, no Q/DQ between) and are timed as one
    group, since one op type alone would measure only its seams."""
    if prec == "int8-static":
        return {f"{prec}:all": dict(fmts)} if fmts else {}
    return {f"{prec}:{op}": {n: f for n, f in fmts.items() if op_of[n] == op}
            for op in sorted({op_of[n] for n in fmts})}


def open_backend(name: str, task: QuantTask, example: tuple[torch.Tensor, ...],
                 input_names: list[str], threads: int) -> Backend:
    if name == ortb.NAME:
        return ortb.OrtBackend.open(task.module, example, input_names, task.layers,
                                    task.calib_inputs, threads)
    if name == "torch-cuda" and not torch.cuda.is_available():
        raise UserError("backend torch-cuda needs a worker with a GPU; this one has none "
                        "(use torch-cpu or onnxruntime-cpu)")
    return torch_runtime.TorchBackend(name, task.module, task.layers)


def _has_conv(task: QuantTask) -> bool:
    return any(isinstance(m, nn.Conv1d | nn.Conv2d) for m in task.layers.values())


def _lora_report(task: QuantTask, recovery: qrec.Recovery, cfg: Config, plain: ConfigPoint,
                 recovered: ConfigPoint) -> LoraRecoveryReport:
    t = recovery.training(cfg) if cfg else None
    return LoraRecoveryReport(
        options=recovery.opts, plain=plain, recovered=recovered, trainings=recovery.trainings,
        train_seconds=round(recovery.seconds, 3),
        loss_before=t.loss_before if t else 0.0, loss_after=t.loss_after if t else 0.0,
        norms=qrec.norms(task, cfg, t.adapters, recovery.inputs) if t else [])


def _adapters_bytes(adapters: qrec.Adapters) -> bytes:
    from safetensors.torch import save

    tensors = {f"{n}.lora_A": a.contiguous() for n, a in adapters.a.items()}
    tensors |= {f"{n}.lora_B": b.contiguous() for n, b in adapters.b.items()}
    return save(tensors, metadata={"rank": str(adapters.rank),
                                   "update": "weight += lora_B @ lora_A / rank, reshaped"})


def _mark_pareto(points: list[ConfigPoint], higher: bool) -> None:
    """A point is on the frontier where no other is as good in both metric and latency and
    better in one. A NaN metric (an fp16 overflow, say) measured nothing: never on it."""

    def better_or_equal(a: ConfigPoint, b: ConfigPoint) -> bool:
        assert a.deployed_metric is not None and b.deployed_metric is not None
        m = a.deployed_metric >= b.deployed_metric if higher else a.deployed_metric <= b.deployed_metric
        return m and (a.latency_ms or 0) <= (b.latency_ms or 0)

    for p in points:
        p.pareto = not math.isnan(p.deployed_metric or 0.0) and not any(
            q is not p and better_or_equal(q, p) and (
            q.deployed_metric != p.deployed_metric or q.latency_ms != p.latency_ms)
            for q in points)


def choose_point(points: dict[str, ConfigPoint], base_key: str, higher: bool, limit: float,
                 metric: str) -> tuple[str, str]:
    """The key of the point to ship, and why.

    Among the measured points inside the budget (fp32 always is), latencies within ``TIE`` of
    the fastest are a tie on a shared machine: among those the better metric wins, then the
    smaller model. A quantized point must also have measured faster than fp32: a slower one is
    never worth shipping, whatever its metric.
    """
    baseline = points[base_key]
    base_ms = baseline.latency_ms or 0.0
    inside = [(k, p) for k, p in points.items() if p.within_budget]
    eligible = [(k, p) for k, p in inside if k == base_key or (p.latency_ms or 0.0) < base_ms]
    fastest = min(p.latency_ms or 0.0 for _, p in eligible)
    ties = [(k, p) for k, p in eligible if (p.latency_ms or 0.0) <= fastest * (1 + TIE)]
    sign = 1.0 if higher else -1.0
    key, chosen = min(ties, key=lambda kp: (-sign * (kp[1].deployed_metric or 0.0),
                                            kp[1].size_bytes or 0))
    n, quantized = len(points), len(inside) - 1
    if chosen.config:
        return key, (
            f"fastest of the {n} measured configurations whose deployed {metric} "
            f"({chosen.deployed_metric:.6f}) meets the threshold {limit:.6f} (latencies within "
            f"{TIE:.0%} count as equal, the better {metric} wins): "
            f"{chosen.latency_ms:.3f} ms vs fp32 {base_ms:.3f} ms")
    if n == 1:
        return key, ("no quantized configuration was offered (the levels hold only fp32, or no "
                     "layer can take them); returning the float model")
    if quantized == 0:
        return key, (f"none of the {n - 1} quantized configurations kept {metric} within the "
                     f"threshold {limit:.6f} on the deployed model; returning the float model")
    faster = len(eligible) - 1
    if faster == 0:
        return key, (f"{quantized} quantized configurations met the threshold {limit:.6f}, but "
                     f"each measured slower than fp32 ({base_ms:.3f} ms) on this backend at "
                     "this batch size; returning the float model")
    best = min(p.latency_ms or 0.0 for k, p in eligible if k != base_key)
    return key, (f"{quantized} quantized configurations met the threshold {limit:.6f}; the "
                 f"{faster} of them faster than fp32 ({base_ms:.3f} ms) gained at most "
                 f"{1 - best / base_ms:.1%}, within the {TIE:.0%} counted as equal, and fp32 "
                 f"has the better {metric} ({baseline.deployed_metric:.6f}); returning the "
                 "float model")
