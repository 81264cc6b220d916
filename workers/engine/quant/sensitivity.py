"""Per-layer sensitivity: Hessian trace x quantization perturbation, augmented with inter-layer
dependencies (after "Augmenting Hessians with Inter-Layer Dependencies for Mixed-Precision PTQ").

- Hessian term (HAWQ-V2 style): Tr(H_l) / n_l * ||Q(W_l) - W_l||^2, the expected loss increase
  of the layer's quantization noise under a second-order model. Tr(H_l) comes from Hutchinson's
  estimator, E[v^T H v] over Rademacher v, with Hessian-vector products by double backward.
- Dependency term: L(all quantized) - L(all quantized except l). A layer whose noise only hurts
  together with the others' noise has a small Hessian term but a large dependency term; adding
  it fixes the ordering the Hessian alone gets wrong.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from workers.engine.context import UserError
from workers.engine.quant.fake import weight_perturbation
from workers.engine.quant.formats import FP32, LayerFormat
from workers.engine.quant.prefix import PrefixReplay
from workers.engine.quant.task import QuantTask


@dataclass
class LayerScore:
    name: str
    type: str
    parameters: int
    hessian_trace: float
    perturbation: float
    hessian_term: float
    dependency_term: float | None = None
    score: float = 0.0
    rank: int = 0


def hutchinson_traces(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                      probes: int, seed: int,
                      on_probe: Callable[[int], None] | None = None) -> list[float]:
    """Tr(H) of ``loss_fn()`` w.r.t. each tensor in ``params`` (its diagonal block of the
    Hessian), one Hessian-vector product per probe for all tensors at once. The loss and its
    gradient graph are built once and kept for every probe: each probe costs one double
    backward, not a forward, a backward and a double backward."""
    gen = torch.Generator().manual_seed(seed)
    totals = [0.0] * len(params)
    loss = loss_fn()
    # allow_unused: a layer the output never reaches (e.g. an unused pooler) has Tr(H) = 0.
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    for k in range(probes):
        vs = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype).mul_(2).sub_(1) for p in params]
        if used:
            hvs = torch.autograd.grad([grads[i] for i in used], [params[i] for i in used],
                                      grad_outputs=[vs[i] for i in used], allow_unused=True,
                                      retain_graph=k < probes - 1)
            for i, hv in zip(used, hvs, strict=True):
                if hv is not None:
                    totals[i] += float((hv * vs[i]).sum())
        if on_probe is not None:
            on_probe(k + 1)
    return [t / probes for t in totals]


def gauss_newton_traces(outputs_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                        probes: int, seed: int,
                        on_probe: Callable[[int], None] | None = None) -> list[float]:
    """Tr(H) w.r.t. each tensor in ``params`` of L = mean_n ||f_n(W) - f_n(W0)||^2 at W = W0,
    where ``outputs_fn()`` returns f(W) (N samples first). The residual is zero there, so
    H = 2/N J^T J exactly and Tr(H_i) = 2/N E_u ||J_i^T u||^2 over Rademacher vectors u in
    the output space: one backward per probe instead of a double backward."""
    gen = torch.Generator().manual_seed(seed)
    totals = [0.0] * len(params)
    out = outputs_fn()
    n = out.shape[0]
    for k in range(probes):
        u = torch.randint(0, 2, out.shape, generator=gen).to(out.dtype).mul_(2).sub_(1)
        grads = torch.autograd.grad(out, params, grad_outputs=u, allow_unused=True,
                                    retain_graph=k < probes - 1)
        for i, g in enumerate(grads):
            if g is not None:
                totals[i] += 2.0 / n * float(g.pow(2).sum())
        if on_probe is not None:
            on_probe(k + 1)
    return [t / probes for t in totals]


def exact_trace(loss_fn: Callable[[], torch.Tensor], param: torch.Tensor) -> float:
    """Tr(H) by building the Hessian column by column (tests; tiny tensors only)."""
    grad = torch.autograd.grad(loss_fn(), [param], create_graph=True)[0].reshape(-1)
    total = 0.0
    for i in range(grad.numel()):
        row = torch.autograd.grad(grad[i], [param], retain_graph=True)[0].reshape(-1)
        total += float(row[i])
    return total


def hessian_method(task: QuantTask, method: str) -> str:
    """The estimator a job runs. "gauss-newton" is exact only for the squared error to the
    float outputs (zero residual); with labels the loss is the cross-entropy, whose Hessian
    has a residual term, so "auto" picks double backward there and Gauss-Newton elsewhere."""
    if method == "auto":
        return "double-backward" if task.labeled else "gauss-newton"
    if method == "gauss-newton" and task.labeled:
        raise UserError("hessian `gauss-newton` (spec.sensitivity.hessian of a mixed_precision "
                        "job, spec.options.hessian of a sensitivity job) equals the Hessian only "
                        "for the squared error to the float model's outputs; this job's loss is "
                        "the cross-entropy with its labels (use `double-backward` or `auto`)")
    return method


def hessian_traces(task: QuantTask, layers: Sequence[str], probes: int, samples: int, seed: int,
                   on_probe: Callable[[int], None] | None = None,
                   method: str = "auto") -> dict[str, float]:
    """Tr(H) of the calibration loss w.r.t. each layer's float weight. It does not depend on
    the precision a layer goes to, so a search over several levels computes it once.
    ``method``: see ``hessian_method``."""
    if not layers:  # autograd refuses an empty list of inputs
        return {}
    method = hessian_method(task, method)
    mods = [task.layers[n] for n in layers]
    params: list[torch.Tensor] = [m.weight for m in mods]  # type: ignore[misc]
    inputs = tuple(t[:samples] for t in task.calib_inputs)
    labels = task.calib_labels[:samples] if task.calib_labels is not None else None
    # The float outputs the squared error compares with (gauss-newton needs none: at the float
    # weights the residual is zero by construction).
    ref = task.forward(inputs) if method == "double-backward" and not task.labeled else None
    saved = [p.requires_grad for p in task.module.parameters()]
    for param in task.module.parameters():
        param.requires_grad_(False)
    for t in params:
        t.requires_grad_(True)

    def loss_fn() -> torch.Tensor:
        out: torch.Tensor = task.module(*inputs).float()
        if ref is None:
            assert labels is not None  # (N, V) or a language model's (N, T, V)
            return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1))
        sq: torch.Tensor = (out - ref).pow(2).flatten(1).sum(1).mean()
        return sq

    try:
        if method == "gauss-newton":
            traces = gauss_newton_traces(lambda: task.module(*inputs).float(), params, probes,
                                         seed, on_probe)
        else:
            traces = hutchinson_traces(loss_fn, params, probes, seed, on_probe)
    finally:
        for param, s in zip(task.module.parameters(), saved, strict=True):
            param.requires_grad_(s)
    return dict(zip(layers, traces, strict=True))


def hessian_terms(task: QuantTask, layers: Sequence[str], fmt_of: Mapping[str, LayerFormat],
                  traces: Mapping[str, float]) -> list[LayerScore]:
    """Per layer: Tr(H) / #weights x ||Q(W) - W||^2 for the layer's format."""
    out = []
    for name in layers:
        mod = task.layers[name]
        w = mod.weight
        assert isinstance(w, torch.Tensor)
        tr = traces[name]
        pert = weight_perturbation(w, fmt_of[name])
        out.append(LayerScore(name, type(mod).__name__, w.numel(), tr, pert, tr / w.numel() * pert))
    return out


def dependency_terms(task: QuantTask, layers: Sequence[str], fmt_of: Mapping[str, LayerFormat],
                     on_step: Callable[[int], None] | None = None,
                     prefix_replay: bool = True, restore: Sequence[str] | None = None,
                     wait: bool = True) -> dict[str, float]:
    """Leave-one-out: how much the calibration loss of the fully quantized model (every layer
    of ``layers``) drops when each layer of ``restore`` (default: all) alone goes back to
    float. Modules that finish before the restored layer's first call replay their outputs
    from the fully quantized forward (``prefix``). Other workers may be computing some of the
    same losses (pieces of the job): a first pass skips those, a second waits for them; with
    ``wait`` off (a piece) there is no second pass and only the losses are memoized."""
    full = {n: fmt_of[n] for n in layers}
    restore = list(layers) if restore is None else list(restore)
    ctx = task.ctx
    memoized = ctx is not None and all(  # a resumed job: nothing left to compute or record
        ctx.memo_get(task.memo_key("loss", c)) is not None
        for c in [full, *({**full, n: FP32} for n in restore)])
    replay = PrefixReplay.plan(task, restore) if prefix_replay and not memoized else None
    if replay is not None:
        outs = replay.record(task, full)
        all_q = task.memoized_unless_taken("loss", full, lambda: float(task.loss(outs)),
                                           wait=wait)
    else:
        all_q = task.calib_loss_unless_taken(full, wait)
    losses: dict[str, float] = {}
    for name in restore:
        with replay.replaying(name) if replay is not None else nullcontext():
            got = task.calib_loss_unless_taken({**full, name: FP32})
        if got is not None:
            losses[name] = got
            if on_step is not None:
                on_step(len(losses))
    if not wait:
        return {} if all_q is None else {n: all_q - v for n, v in losses.items()}
    for name in restore:
        if name not in losses:
            losses[name] = task.calib_loss({**full, name: FP32})
            if on_step is not None:
                on_step(len(losses))
    assert all_q is not None
    return {name: all_q - losses[name] for name in restore}


def pairwise_terms(task: QuantTask, layers: Sequence[str], fmt_of: Mapping[str, LayerFormat]
                   ) -> dict[str, float]:
    """CLADO-style cross terms: L(i, j) - L(i) - L(j) + L(none) for every pair."""
    base = task.calib_loss({})
    single = {n: task.calib_loss({n: fmt_of[n]}) for n in layers}
    out = {}
    for a, b in itertools.combinations(layers, 2):
        both = task.calib_loss({a: fmt_of[a], b: fmt_of[b]})
        out[f"{a}|{b}"] = both - single[a] - single[b] + base
    return out


def combine(scores: list[LayerScore], deps: Mapping[str, float] | None, weight: float,
            pairwise: Mapping[str, float] | None = None) -> list[LayerScore]:
    """score = h / sum(h) + weight * d / sum(d), negatives clipped (noise); pairwise terms add
    half of each positive cross term to both layers' dependency.

    Where the fully quantized loss overflows (fp16 everywhere), a layer whose restoring alone
    makes it finite has d = inf: it ranks above every finite score (1 + weight at most). A NaN
    d (inf - inf: the loss overflows with the layer restored too) says nothing: it adds 0."""
    h_total = sum(max(s.hessian_term, 0.0) for s in scores) or 1.0
    d: dict[str, float] = {}
    overflow: set[str] = set()
    if deps is not None:
        overflow = {k for k, v in deps.items() if v == math.inf}
        d = {k: max(v, 0.0) for k, v in deps.items() if math.isfinite(v)}
        for s in scores:
            s.dependency_term = deps[s.name]
    if pairwise:
        for key, v in pairwise.items():
            if not math.isfinite(v):
                continue
            a, b = key.split("|")
            d[a] = d.get(a, 0.0) + max(v, 0.0) / 2
            d[b] = d.get(b, 0.0) + max(v, 0.0) / 2
    d_total = sum(d.values()) or 1.0
    for s in scores:
        s.score = max(s.hessian_term, 0.0) / h_total + weight * d.get(s.name, 0.0) / d_total
        if s.name in overflow:
            s.score += 1.0 + weight
    for rank, s in enumerate(sorted(scores, key=lambda s: s.score)):
        s.rank = rank
    return scores
