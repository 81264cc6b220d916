"""The pieces of the search, each against something exact."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from workers.engine.backends import onnxruntime_cpu as ortb
from workers.engine.quant import fake
from workers.engine.quant import search as qsearch
from workers.engine.quant.formats import LayerFormat
from workers.engine.quant.sensitivity import (
    LayerScore,
    combine,
    exact_trace,
    gauss_newton_traces,
    hutchinson_traces,
)
from workers.engine.quant.task import threshold


def test_hutchinson_matches_exact_hessian_trace() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    params = [net[0].weight, net[2].weight]

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(net(x), y)

    exact = [exact_trace(loss, p) for p in params]
    est = hutchinson_traces(loss, params, probes=1000, seed=1)
    for e, h in zip(exact, est, strict=True):
        assert h == pytest.approx(e, rel=0.08), (e, h)
    # Few probes are noisy but unbiased: the mean of many 1-probe estimates converges too.
    few = [hutchinson_traces(loss, params[:1], probes=1, seed=s)[0] for s in range(200)]
    assert sum(few) / len(few) == pytest.approx(exact[0], rel=0.15)


def test_gauss_newton_matches_exact_hessian_trace_of_the_squared_error_to_float() -> None:
    # The loss the engine uses without labels: squared error to the float model's own outputs,
    # at the float weights (zero residual, so the Hessian is exactly 2/N J^T J).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(32, 6)
    with torch.no_grad():
        ref = net(x)
    params = [net[0].weight, net[2].weight]

    def loss() -> torch.Tensor:
        return (net(x) - ref).pow(2).sum(1).mean()

    exact = [exact_trace(loss, p) for p in params]
    est = gauss_newton_traces(lambda: net(x), params, probes=1000, seed=1)
    hvp = hutchinson_traces(loss, params, probes=1000, seed=1)
    for e, g, h in zip(exact, est, hvp, strict=True):
        assert g == pytest.approx(e, rel=0.05) and h == pytest.approx(e, rel=0.08), (e, g, h)


def test_bisection_finds_the_boundary_of_a_monotone_case() -> None:
    for n in (1, 2, 7, 64):
        for boundary in range(n + 1):
            calls: list[int] = []

            def ok(k: int, b: int = boundary, calls: list[int] = calls) -> bool:
                calls.append(k)
                return k <= b

            assert qsearch.bisect_boundary(ok, n) == boundary
            assert len(calls) <= 2 + n.bit_length()


def test_bisection_search_over_levels_descends_only_from_the_previous_level() -> None:
    names = [f"l{i}" for i in range(8)]
    int8 = {n: LayerFormat("int8") for n in names}
    int4 = {n: LayerFormat("int4") for n in names[:6]}
    cost = {"int8": 1.0, "int4": 3.0}

    def evaluate(cfg: object) -> float:  # metric falls by a fixed amount per quantized layer
        assert isinstance(cfg, dict)
        return 100.0 - sum(cost[f.precision] for f in cfg.values())

    limit = threshold(100.0, "absolute", 14.0, True)
    levels = [("int8", qsearch.Level(int8, names)), ("int4", qsearch.Level(int4, names[:6]))]
    out = qsearch.bisection_search(evaluate, limit, levels, "test")
    # all 8 to int8 costs 8; each int4 adds 2 more: 3 of them reach exactly 14.
    assert out.boundaries == {"int8": 8, "int4": 3}
    assert [n for n, f in out.config.items() if f.precision == "int4"] == names[:3]
    assert out.metric == 86.0


def test_a_layer_no_earlier_level_offers_descends_from_fp32() -> None:
    """bf16 gated out for l2 and l3 (say): int8 may still take them, straight from fp32;
    l0 and l1, offered bf16 but left fp32 by the bisection, may not skip it."""
    names = ["l0", "l1", "l2", "l3"]
    bf16 = {n: LayerFormat("bf16") for n in names[:2]}
    int8 = {n: LayerFormat("int8") for n in names}
    cost = {"bf16": 1.0, "int8": 2.0}

    def evaluate(cfg: object) -> float:  # metric falls by a fixed amount per layer and format
        assert isinstance(cfg, dict)
        return 100.0 - sum(cost[f.precision] for f in cfg.values())

    levels = [("bf16", qsearch.Level(bf16, names[:2])), ("int8", qsearch.Level(int8, names))]

    def search(budget: float) -> dict[str, str]:
        out = qsearch.bisection_search(evaluate, threshold(100.0, "absolute", budget, True),
                                       levels, "test")
        return {n: f.precision for n, f in out.config.items()}

    assert search(1.0) == {"l0": "bf16"}  # l1 stays fp32 and may not jump to int8
    assert search(6.0) == {"l0": "int8", "l1": "int8", "l2": "int8"}  # l2 from fp32
    assert search(99.0) == dict.fromkeys(names, "int8")
    sweep = qsearch.sweep(levels, {"bf16": 2, "int8": 4}, 2)
    assert {n: f.precision for n, f in sweep[-1].items()} == dict.fromkeys(names, "int8")


def test_thresholds() -> None:
    assert threshold(0.9, "relative", 0.999, True).value == pytest.approx(0.8991)
    assert threshold(2.0, "relative", 0.99, False).value == pytest.approx(2.02)
    # a negative baseline (a log-likelihood, say): the budget still lies on the worse side
    assert threshold(-2.0, "relative", 0.9, True).value == pytest.approx(-2.2)
    assert threshold(-2.0, "relative", 0.9, False).value == pytest.approx(-1.8)
    assert threshold(-2.0, "relative", 0.9, True).ok(-2.0)
    assert threshold(0.9, "absolute", 0.01, True).ok(0.8901)
    assert not threshold(0.9, "absolute", 0.01, True).ok(0.889)


def test_fake_int4_and_int8_grids() -> None:
    w = torch.randn(16, 64)
    blocks = fake.int4_weight(w, 32).reshape(16, 2, 32)
    scale = w.reshape(16, 2, 32).abs().amax(2, keepdim=True) / 8  # the extreme maps to -8
    steps = blocks / scale
    assert torch.allclose(steps, torch.round(steps), atol=1e-4)
    assert steps.abs().max() <= 8  # [-8, 7] in units of the signed scale
    q8 = fake.int8_weight(w)
    scale8 = w.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(q8 / scale8, torch.round(q8 / scale8), atol=1e-3)
    assert (q8 - w).abs().max() <= scale8.max() / 2 + 1e-6


def test_fake_int4_matches_ort_on_ties() -> None:
    # The cases random weights never hit: a block whose max and min have one magnitude (ORT
    # scales by the negative one), codes exactly halfway (ORT rounds half up), and weights
    # already on a coarser grid (a checkpoint quantized before), where such halves are common.
    torch.manual_seed(0)
    w = torch.randn(4, 64) * 0.1
    w[0, 0], w[0, 5] = 1.0, -1.0
    w[1] = 0.0
    w[1, :6] = torch.tensor([-8.0, 3.5, -2.5, 0.5, 1.5, -0.5])
    w[2] = torch.round(w[2] / (w[2].abs().max() / 64)) * (w[2].abs().max() / 64)
    lin = nn.Linear(64, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    model, x = nn.Sequential(lin).eval(), torch.eye(64)
    exported = ortb.export(model, (x[:8],), ["x"], {"0": lin})
    cfg = {"0": ortb.native_format(exported, "0", LayerFormat("int4", group_size=32))}
    deployed = ortb.Session(ortb.realize(exported, cfg), 1).run((x,))  # (64, 4): W_deq^T
    simulated = fake.int4_weight(w, 32).T.numpy()
    assert (abs(deployed - simulated) <= 1e-6).all(), (deployed - simulated).nonzero()


def test_a_non_finite_inter_layer_term_does_not_void_the_ordering() -> None:
    """The fully quantized model's loss can overflow (fp16 everywhere): restoring the layer
    that overflows gives an infinite drop, and inf - inf is NaN. Such terms used to make every
    score NaN (the order then fell back to definition order, silently)."""
    hess = {"a": 0.1, "b": 0.4, "c": 0.3, "d": 0.2}
    scores = [LayerScore(n, "Linear", 10, h, 1.0, h) for n, h in hess.items()]
    deps = {"a": float("inf"), "b": 1.0, "c": float("nan"), "d": 3.0}
    out = {s.name: s for s in combine(scores, deps, weight=1.0)}
    assert all(math.isfinite(s.score) for s in out.values()), out
    assert out["a"].rank == 3  # restoring it alone removes the overflow: the most sensitive
    # the finite terms are normalized among themselves; the NaN one adds nothing
    assert out["d"].score == pytest.approx(0.2 + 0.75) and out["b"].score == pytest.approx(0.65)
    assert out["c"].score == pytest.approx(0.3)
    assert math.isnan(out["c"].dependency_term or 0.0)  # reported as measured
