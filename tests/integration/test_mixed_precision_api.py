"""The mixed-precision job through the API, on the zoo model and on a user's own upload
(a .pt2 plus a labeled .npz), as the README shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.config import Settings
from app.schemas import MixedPrecisionResult, MixedPrecisionSpec, ModelRef
from app.storage import open_store
from tests.conftest import Stack
from workers.engine import datasets, zoo

pytestmark = pytest.mark.slow

FAST = {"sensitivity": {"probes": 4, "calibration_samples": 64}, "repeats": 10, "warmup": 2,
        "frontier_points": 3, "batch_size": 64}


def test_zoo_model_within_budget(stack: Stack, tmp_path: Path) -> None:
    with stack.client() as client:
        spec = MixedPrecisionSpec.model_validate({"model": {"zoo": "digits-cnn"}, **FAST})
        job = client.jobs.wait(client.jobs.create(spec).id, timeout=300)
        res = job.result
        assert isinstance(res, MixedPrecisionResult)
        assert res.chosen.within_budget and res.chosen.deployed_metric is not None
        assert res.chosen.deployed_metric >= res.threshold
        assert res.frontier and any(p.pareto for p in res.frontier)
        stages = {p["stage"] for p in (e.progress.model_dump() for e in
                                       client.jobs.events(job.id) if e.progress)}
        assert {"load", "sensitivity", "search", "frontier", "done"} <= stages
        onnx_path = client.jobs.download(job.id, "model.onnx", tmp_path)
        report = client.jobs.download(job.id, "report.json", tmp_path)
        assert MixedPrecisionResult.model_validate_json(report.read_bytes()) == res
        import onnxruntime as ort

        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        x = datasets.digits("test").inputs["x"].numpy()
        acc = (sess.run(None, {"x": x})[0].argmax(1) == datasets.digits("test").labels.numpy()).mean()
        assert acc == pytest.approx(res.chosen.deployed_metric)


def test_users_own_pt2_and_labeled_dataset(stack: Stack, tmp_path: Path, shared_store: Path) -> None:
    model, _ = zoo.digits_cnn(open_store(Settings(store_url=shared_store.as_uri())))
    batch = torch.export.Dim("batch", min=1, max=4096)
    x = datasets.digits("test").inputs["x"]
    torch.export.save(torch.export.export(model, (x[:8],), dynamic_shapes={"x": {0: batch}}),
                      str(tmp_path / "digits.pt2"))
    np.savez(tmp_path / "digits.npz", x=x.numpy(), y=datasets.digits("test").labels.numpy())
    with stack.client() as client:
        mdl = client.models.upload(tmp_path / "digits.pt2", name="my digits")
        dst = client.datasets.upload(tmp_path / "digits.npz", name="my labeled digits")
        spec = MixedPrecisionSpec.model_validate({
            "model": {"id": mdl.id}, "dataset": {"id": dst.id},
            "budget": {"metric": "accuracy", "mode": "absolute", "value": 0.01}, **FAST})
        res = client.jobs.wait(client.jobs.create(spec).id, timeout=300).result
        assert isinstance(res, MixedPrecisionResult)
        assert res.metric == "accuracy" and res.baseline.deployed_metric == pytest.approx(0.975)
        assert {s.name for s in res.sensitivity} <= {"conv1", "conv2", "fc1", "fc2", "fc3"}
        assert res.sensitivity, "the uploaded program's layers were found"
        assert res.chosen.deployed_metric is not None
        assert res.chosen.deployed_metric >= res.threshold - 1e-9
    assert ModelRef(id=mdl.id).label() == mdl.id


def test_intrinsic_dimension_of_an_uploaded_model(stack: Stack, tmp_path: Path) -> None:
    """The same uploaded-model path for intrinsic dimension: a user's .pt2 (its architecture,
    re-initialized) and labeled .npz; the downloaded artifact rebuilds the reported accuracy."""
    import json

    from app.schemas import IntrinsicDimensionResult, IntrinsicDimensionSpec
    from workers.engine import graph_layers
    from workers.engine.intrinsic.subspace import Artifact, evaluate, rebuild, reinit_factory

    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 10))
    digits = datasets.digits("train")
    x, y = digits.inputs["x"], digits.labels
    assert y is not None
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.save(torch.export.export(mlp.eval(), (x[:8],), dynamic_shapes={"input": {0: batch}}),
                      str(tmp_path / "mlp.pt2"))
    np.savez(tmp_path / "digits.npz", x=x.numpy(), y=y.numpy())
    with stack.client() as client:
        mdl = client.models.upload(tmp_path / "mlp.pt2", name="my mlp")
        dst = client.datasets.upload(tmp_path / "digits.npz", name="digits train")
        spec = IntrinsicDimensionSpec.model_validate({
            "model": {"id": mdl.id}, "dataset": {"id": dst.id}, "grid": [20, 200, 1000],
            "epochs": 4, "layer_scaling": True})
        job = client.jobs.wait(client.jobs.create(spec).id, timeout=300)
        res = job.result
        assert isinstance(res, IntrinsicDimensionResult), job.error
        assert res.parameters == 64 * 32 + 32 + 32 * 10 + 10 == res.reinitialized_parameters
        assert res.model == mdl.id and res.layer_scaling and res.full_accuracy > 0.5  # 4 epochs
        if res.d_int90 is None:
            return
        art = Artifact(**json.loads(client.jobs.download(job.id, "intrinsic.json",
                                                         tmp_path).read_bytes()))
    assert art.layer_scales is not None and art.layer_scales.numel() == 4
    ep = torch.export.load(tmp_path / "mlp.pt2")
    factory = reinit_factory(graph_layers.restore_layers(ep.module()))  # type: ignore[arg-type]
    cut = int(len(y) * 0.8)
    acc = evaluate(rebuild(art, factory), None, x[cut:], y[cut:])
    assert acc == pytest.approx(res.rebuilt_accuracy, abs=1e-9) and acc >= res.target
