"""Uploaded models with 1-D convolutions: ``aten.conv1d`` calls become ``nn.Conv1d`` layers, which
are scored and deployed like any other (ORT's ConvInteger / QLinearConv run 1-D too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from app.config import Settings
from app.schemas import DatasetRef, ModelRef, SensitivitySpec
from app.storage import open_store
from workers.engine import graph_layers, mixed_precision
from workers.engine.backends import onnxruntime_cpu as ortb
from workers.engine.context import LocalContext
from workers.engine.quant import sensitivity as qsens
from workers.engine.quant.fake import simulate
from workers.engine.quant.formats import LayerFormat
from workers.engine.quant.prepare import build_task
from workers.engine.quant.task import QuantTask, quantizable_layers

pytestmark = pytest.mark.slow


class Signal1d(nn.Module):
    """A small 1-D CNN: padding, a stride and groups, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 32, 3, padding=1)
        self.c2 = nn.Conv1d(32, 32, 3, stride=2, groups=4)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        out: torch.Tensor = self.head(h.mean(2))
        return out


def exported(path: Path) -> Path:
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(Signal1d().eval(), (torch.randn(4, 4, 64),),
                             dynamic_shapes={"x": {0: batch}})
    torch.export.save(ep, str(path))
    return path


def signals(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 4, 64))
                            .astype("float32"))


def test_conv1d_layers_are_restored_and_deploy_as_simulated(tmp_path: Path) -> None:
    ep = torch.export.load(str(exported(tmp_path / "m.pt2")))
    x = signals(256, 0)
    with torch.inference_mode():
        want = ep.module()(x)
    model = graph_layers.restore_layers(ep.module())  # type: ignore[arg-type]
    layers = quantizable_layers(model)
    assert {n: type(m) for n, m in layers.items()} == {
        "c1": nn.Conv1d, "c2": nn.Conv1d, "head": nn.Linear}
    c2 = layers["c2"]
    assert isinstance(c2, nn.Conv1d) and (c2.stride, c2.groups, c2.kernel_size) == ((2,), 4, (3,))
    with torch.inference_mode():
        assert torch.equal(model(x), want)

    onnx = ortb.export(model, (x[:8],), ["x"], layers)
    onnx.set_calibration((signals(128, 1),))
    int8, static = LayerFormat("int8"), LayerFormat("int8", activations="static")
    cases = {"int8 c1": {"c1": int8}, "int8 c2": {"c2": int8},
             "static c1": {"c1": static}, "static c2": {"c2": static},
             "all static": {n: static for n in layers}}
    with torch.inference_mode():
        flt = model(x).numpy()
    failed = []
    for label, cfg in cases.items():
        native = {n: ortb.native_format(onnx, n, f) for n, f in cfg.items()}
        assert all(f.realizable for f in native.values()), label
        deployed = ortb.Session(ortb.realize(onnx, native), 1).run((x,))
        with simulate(layers, native), torch.inference_mode():
            simulated = model(x).numpy()
        quant = np.linalg.norm(deployed - flt)
        assert quant > 0, label
        share = float(np.linalg.norm(deployed - simulated) / quant)
        within = float((np.abs(deployed - simulated) <= 1e-4).mean())
        # The same bounds as digits-cnn's (test_mixed_precision_job): one layer to summation
        # order, a static chain within 10% of its quantization error.
        if not (share <= 0.1 if label == "all static" else within >= 0.98 and share <= 0.05):
            failed.append(f"{label}: within 1e-4 {within:.4f}, unexplained {share:.4f}")
    assert not failed, failed


MODEL, DATASET = ModelRef(id="mdl_" + "c" * 32), DatasetRef(id="dst_" + "d" * 32)


def uploaded(tmp_path: Path) -> LocalContext:
    """A job context whose store holds Signal1d as upload MODEL and 128 signals as DATASET."""
    store = open_store(Settings(store_url=(tmp_path / "store").as_uri()))
    store.put_file(f"tenants/local/models/{MODEL.id}/model.pt2", exported(tmp_path / "m.pt2"))
    data = tmp_path / "data.npz"
    np.savez(data, x=signals(128, 2).numpy())
    store.put_file(f"tenants/local/datasets/{DATASET.id}/data.npz", data)
    return LocalContext(tmp_path / "work", store=store)


def test_uploaded_conv1d_model_is_scored_at_every_precision(tmp_path: Path) -> None:
    ctx = uploaded(tmp_path)
    spec = SensitivitySpec.model_validate({
        "model": MODEL, "dataset": DATASET, "options": {"probes": 2, "calibration_samples": 32}})
    for precision in ("int8", "int8-static", "int4"):
        res = mixed_precision.run_sensitivity(spec.model_copy(update={"precision": precision}),
                                              ctx)
        assert [(s.name, s.type) for s in res.layers] == [
            ("c1", "Conv1d"), ("c2", "Conv1d"), ("head", "Linear")], precision
        assert all(s.perturbation > 0 and s.dependency_term is not None for s in res.layers)


def test_samples_shared_by_evaluation_and_calibration_or_training_are_said(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ctx = uploaded(tmp_path)
    with caplog.at_level("WARNING"):
        build_task(MODEL, DATASET, None, 64, 64, ctx, train_samples=32)
    assert "evaluation samples" not in caplog.text  # 64 + 64 and 64 + 32 fit in 128
    with caplog.at_level("WARNING"):
        build_task(MODEL, DATASET, None, 100, 64, ctx, train_samples=64)
    assert "calibration uses 36 of the 100 evaluation samples (the data has 128; 164" \
        in caplog.text
    assert "LoRA training uses 36 of the 100 evaluation samples" in caplog.text
    assert "optimistic" in caplog.text


def test_hessian_traces_of_no_layers_is_empty() -> None:
    """(autograd.grad refuses an empty list of inputs)"""
    model = Signal1d()
    x = signals(8, 3)
    task = QuantTask(model, quantizable_layers(model), (x,), None, (x,), None, "cosine")
    assert qsens.hessian_traces(task, [], probes=2, samples=8, seed=0) == {}
