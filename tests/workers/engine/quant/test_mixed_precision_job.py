"""The mixed-precision job on digits-cnn, called as library code, and the ONNX backend's
agreement with the simulation the search relies on."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from app.config import Settings
from app.schemas import Budget, MixedPrecisionResult, MixedPrecisionSpec, ModelRef, SensitivitySpec
from app.storage import open_store
from workers.engine import datasets, mixed_precision, zoo
from workers.engine.backends import onnxruntime_cpu as ortb
from workers.engine.context import LocalContext
from workers.engine.quant.fake import simulate
from workers.engine.quant.formats import LayerFormat
from workers.engine.quant.task import quantizable_layers

pytestmark = pytest.mark.slow

FAST = {"sensitivity": {"probes": 4, "calibration_samples": 64}, "repeats": 5, "warmup": 1,
        "frontier_points": 3}


def ctx_for(tmp_path: Path, store: Path) -> LocalContext:
    return LocalContext(tmp_path / "work", store=open_store(Settings(store_url=store.as_uri())))


def run(tmp_path: Path, store: Path, **kw: object) -> MixedPrecisionResult:
    spec = MixedPrecisionSpec.model_validate({"model": {"zoo": "digits-cnn"}, **FAST, **kw})
    return mixed_precision.run(spec, ctx_for(tmp_path, store))


def test_deployed_onnx_matches_simulation(shared_store: Path) -> None:
    """Tolerances. One quantized layer: 1e-4 absolute on the logits (the integer arithmetic is
    reproduced exactly; float32 summation order remains). Chains of dynamically quantized
    layers: a 1e-6 float difference can flip an activation's uint8 rounding in the next layer,
    so there we require the simulation to explain >= 95% of the quantization error
    (||deployed - simulated|| <= 0.05 ||deployed - float||), a mean absolute error <= 1e-3 and
    >= 99% agreement of the predicted class."""
    model, _ = zoo.digits_cnn(open_store(Settings(store_url=shared_store.as_uri())))
    layers = quantizable_layers(model)
    x = datasets.digits("test").inputs["x"]
    exported = ortb.export(model, (x[:8],), ["x"], layers)
    int8, int4 = LayerFormat("int8"), LayerFormat("int4", group_size=32)
    cases: dict[str, tuple[dict[str, LayerFormat], bool]] = {
        "int8 fc2 alone": ({"fc2": int8}, True),
        "int4 fc1 alone": ({"fc1": int4}, True),
        "int8 conv1 alone": ({"conv1": int8}, True),
        "int4 MatMuls": ({n: int4 for n in ("fc1", "fc2", "fc3")}, True),
        "int8 MatMuls": ({n: int8 for n in ("fc1", "fc2", "fc3")}, False),
        "mixed": ({"fc1": int4, "fc2": int8, "fc3": int8}, False),
        "all int8": ({n: int8 for n in layers}, False),
    }
    with torch.inference_mode():
        flt = model(x).numpy()
    for label, (cfg, exact) in cases.items():
        native = {n: ortb.native_format(exported.op_of[n], f) for n, f in cfg.items()}
        deployed = ortb.Session(ortb.realize(exported, native), 1).run((x,))
        with simulate(layers, native), torch.inference_mode():
            simulated = model(x).numpy()
        err = np.abs(deployed - simulated)
        quant = np.linalg.norm(deployed - flt)
        assert quant > 0, label  # the quantization is really there
        if exact:
            assert err.max() <= 1e-4, (label, err.max())
        else:
            assert np.linalg.norm(deployed - simulated) <= 0.05 * quant, label
            assert err.mean() <= 1e-3, (label, err.mean())
            assert (deployed.argmax(1) == simulated.argmax(1)).mean() >= 0.99, label


def test_budget_everything_meets_gives_most_compressed(tmp_path: Path, shared_store: Path) -> None:
    res = run(tmp_path, shared_store, budget={"mode": "absolute", "value": 1.0},
              latency_gate=False, baselines=[])
    ours = next(s for s in res.searches if s.ordering == "augmented")
    assert ours.result.config == {"conv1": "int8", "conv2": "int8", "fc1": "int4-g32",
                                  "fc2": "int4-g32", "fc3": "int4-g32"}
    assert ours.boundaries == {"int8": 5, "int4": 3}


def test_budget_nothing_meets_returns_float_with_reason(tmp_path: Path, shared_store: Path) -> None:
    res = run(tmp_path, shared_store, budget={"metric": "mse", "mode": "absolute", "value": 0.0},
              latency_gate=False, baselines=["uniform"])
    assert res.chosen.config == {} and res.chosen.label == "fp32"
    assert "none of the" in res.why and "float model" in res.why
    assert all(not p.within_budget for p in res.frontier if p.config)


def test_default_job_report_and_artifacts(tmp_path: Path, shared_store: Path) -> None:
    ctx = ctx_for(tmp_path, shared_store)
    spec = MixedPrecisionSpec.model_validate({"model": {"zoo": "digits-cnn"}, **FAST,
                                              "baselines": ["uniform", "hessian", "random",
                                                            "greedy"]})
    res = mixed_precision.run(spec, ctx)
    assert res.metric == "accuracy" and res.threshold == pytest.approx(
        res.baseline.deployed_metric * 0.999)
    assert res.chosen.within_budget
    assert {s.ordering for s in res.searches} >= {"augmented", "hessian", "random", "greedy"}
    assert any(p.pareto for p in res.frontier) and res.baseline in res.frontier
    assert set(res.latency_gate) >= {"int8:MatMul", "int8:Conv", "int4:MatMul"}
    assert {s.name for s in res.sensitivity} <= {"conv1", "conv2", "fc1", "fc2", "fc3"}
    for s in res.sensitivity:
        assert math.isfinite(s.hessian_trace) and s.perturbation > 0 and s.dependency_term is not None
    arts = ctx.workdir / "artifacts"
    assert {"model.onnx", "report.json", "config.json"} <= {p.name for p in arts.iterdir()}
    assert MixedPrecisionResult.model_validate_json((arts / "report.json").read_bytes()) == res
    # The artifact is the chosen model and runs on ONNX Runtime.
    import onnxruntime as ort

    sess = ort.InferenceSession(str(arts / "model.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": datasets.digits("test").inputs["x"][:4].numpy()})[0]
    assert out.shape == (4, 10)


def test_sensitivity_job(tmp_path: Path, shared_store: Path) -> None:
    ctx = ctx_for(tmp_path, shared_store)
    res = mixed_precision.run_sensitivity(SensitivitySpec(
        model=ModelRef(zoo="digits-cnn"), options={"probes": 4, "dependency": "pairwise",  # type: ignore[arg-type]
                                                   "calibration_samples": 64}), ctx)
    assert [layer.rank for layer in sorted(res.layers, key=lambda r: r.score)] == list(range(5))
    assert res.pairwise is not None and len(res.pairwise) == 10
    assert Budget().value == 0.999
