"""LoRA accuracy recovery: adapters trained through the quantized arithmetic, merged into the
weights before quantization, and the search that uses the recovered metric."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.config import Settings
from app.schemas import LoraRecovery, MixedPrecisionSpec
from app.storage import open_store
from workers.engine import datasets, mixed_precision, zoo
from workers.engine.backends import onnxruntime_cpu as ortb
from workers.engine.context import LocalContext
from workers.engine.quant import recovery as qrec
from workers.engine.quant.fake import simulate
from workers.engine.quant.formats import LayerFormat
from workers.engine.quant.task import QuantTask, quantizable_layers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only digits-cnn is needed (trained in ~10 s), not the whole shared zoo."""
    root = tmp_path_factory.mktemp("store")
    zoo.digits_cnn(open_store(Settings(store_url=root.as_uri())))
    return root


@pytest.fixture(scope="module")
def task(store: Path) -> QuantTask:
    model, _ = zoo.digits_cnn(open_store(Settings(store_url=store.as_uri())))
    test, train = datasets.digits("test"), datasets.digits("train")
    return QuantTask(model, quantizable_layers(model), (test.inputs["x"],), test.labels,
                     (train.inputs["x"][:128],), train.labels[:128], "accuracy",
                     train_inputs=(train.inputs["x"][:512],))


def _logits_error(task: QuantTask, config: dict[str, LayerFormat],
                  adapters: qrec.Adapters | None = None) -> float:
    """Mean squared distance of the quantized model's logits to the float model's (eval)."""
    with simulate(task.layers, config) if adapters is None else _both(task, config, adapters):
        out = task.forward(task.eval_inputs)
    return float((out - task.reference).pow(2).sum(1).mean())


def _both(task: QuantTask, config: dict[str, LayerFormat], adapters: qrec.Adapters):  # type: ignore[no-untyped-def]
    from contextlib import ExitStack

    stack = ExitStack()
    stack.enter_context(qrec.merged(task.layers, adapters))
    stack.enter_context(simulate(task.layers, config))
    return stack


def test_adapters_start_at_the_plain_model_and_recover_held_out_error(task: QuantTask) -> None:
    """B = 0 at the start, so an untrained adapter changes nothing; after training on the
    training split the quantized model is closer to the float one on the held-out test split
    (int4 weight-only on the two Linear layers: pure weight error, what adapters can absorb)."""
    int4 = LayerFormat("int4", group_size=32)
    config = {"fc1": int4, "fc2": int4}
    assert task.train_inputs is not None
    ref = task.forward(task.train_inputs)
    untrained = qrec.train(task, config, LoraRecovery(steps=0 + 1, learning_rate=1e-12),
                           task.train_inputs, ref)
    assert untrained.loss_after == pytest.approx(untrained.loss_before, rel=1e-5)
    weights = {n: m.weight.detach().clone() for n, m in task.layers.items()}  # type: ignore[union-attr]
    t = qrec.train(task, config, LoraRecovery(rank=4, steps=150, learning_rate=3e-3),
                   task.train_inputs, ref)
    for n, m in task.layers.items():  # training and evaluation leave the float weights alone
        assert torch.equal(m.weight, weights[n])  # type: ignore[arg-type]
    assert t.loss_after < 0.7 * t.loss_before
    plain, recovered = _logits_error(task, config), _logits_error(task, config, t.adapters)
    assert recovered < 0.8 * plain, (plain, recovered)
    for n in config:
        assert t.adapters.a[n].shape[0] == 4 and t.adapters.b[n].shape[1] == 4
    norms = qrec.norms(task, config, t.adapters, task.eval_inputs)
    assert [x.layer for x in norms] == ["fc1", "fc2"]
    assert all(x.input_max > 0 and x.b_max > 0 and x.update_fro > 0 for x in norms)


def test_recovered_model_deploys_as_simulated(task: QuantTask) -> None:
    """The merged model, exported and realized with ONNX Runtime's kernels, computes what the
    search evaluated: int4 weight-only fc2 (K = 256, exact on every CPU we measured)."""
    config = {"fc2": LayerFormat("int4", group_size=32)}
    assert task.train_inputs is not None
    rec = qrec.Recovery(task, LoraRecovery(rank=4, steps=40, learning_rate=3e-3),
                        task.train_inputs)
    adapters = rec.training(config).adapters
    x = task.eval_inputs[0]
    merged = qrec.merged_copy(task.module, task.layers, adapters)
    exported = ortb.export(merged, (x[:8],), ["x"], quantizable_layers(merged))
    sess = ortb.Session(ortb.realize(exported, config), 1)
    deployed = torch.from_numpy(np.concatenate([sess.run((x[i:i + 64],))
                                                for i in range(0, len(x), 64)]))
    with qrec.merged(task.layers, adapters), simulate(task.layers, config):
        simulated = task.forward(task.eval_inputs)
    assert (deployed - simulated).abs().max() < 1e-4
    assert rec.evaluate(config) == task.score(simulated)


def test_recovered_metric_is_memoized_in_the_job(task: QuantTask, tmp_path: Path) -> None:
    """A retried job (a new Recovery over the same job memo) reads the recovered metric back
    instead of retraining for it; other LoRA options are other entries."""
    import dataclasses

    config = {"fc2": LayerFormat("int4", group_size=32)}
    assert task.train_inputs is not None
    ctx = LocalContext(tmp_path)
    with_ctx = dataclasses.replace(task, ctx=ctx)
    opts = LoraRecovery(rank=4, steps=20, learning_rate=3e-3)
    first = qrec.Recovery(with_ctx, opts, task.train_inputs)
    value = first.evaluate(config)
    assert first.trainings == 1
    again = qrec.Recovery(with_ctx, opts, task.train_inputs)
    assert again.evaluate(config) == value and again.trainings == 0
    other = qrec.Recovery(with_ctx, opts.model_copy(update={"steps": 21}), task.train_inputs)
    other.evaluate(config)
    assert other.trainings == 1


def test_static_levels_are_refused_with_a_reason(tmp_path: Path, store: Path) -> None:
    from workers.engine.context import UserError

    spec = MixedPrecisionSpec.model_validate({"model": {"zoo": "digits-cnn"}, "lora": {}})
    ctx = LocalContext(tmp_path / "w", store=open_store(Settings(store_url=store.as_uri())))
    with pytest.raises(UserError, match="dynamic levels"):
        mixed_precision.run(spec, ctx)


def test_job_with_recovery_searches_beyond_the_plain_boundary(tmp_path: Path,
                                                              store: Path) -> None:
    """digits-cnn with dynamic int8 then int4 and a tight budget: the recovered search starts
    at the plain boundary, trains adapters per config it evaluates, and its result is realized
    with the adapters merged; the report carries both points and the adapter norms."""
    spec = MixedPrecisionSpec.model_validate({
        "model": {"zoo": "digits-cnn"}, "levels": ["int8", "int4"], "latency_gate": False,
        "budget": {"value": 0.999}, "baselines": [], "frontier_points": 2, "repeats": 3,
        "warmup": 1, "sensitivity": {"probes": 2, "calibration_samples": 64},
        "lora": {"rank": 4, "steps": 30, "learning_rate": 3e-3, "samples": 256}})
    ctx = LocalContext(tmp_path / "w", store=open_store(Settings(store_url=store.as_uri())))
    result = mixed_precision.run(spec, ctx)
    assert result.lora is not None
    runs = {s.ordering: s for s in result.searches}
    plain, rec = runs["augmented"], runs["augmented+lora"]
    first = result.levels[0]
    assert rec.boundaries[first] >= plain.boundaries[first]
    assert result.lora.plain == plain.result and result.lora.recovered == rec.result
    assert result.lora.trainings >= rec.evaluations >= 1
    if rec.result.config:
        assert rec.result.label == "search:augmented+lora"
        assert rec.result.deployed_metric is not None and rec.result.latency_ms is not None
        assert "lora.safetensors" in ctx.artifacts
        assert {n.layer for n in result.lora.norms} == set(rec.result.config)
        assert result.lora.loss_after <= result.lora.loss_before
    assert any(p.label == "search:augmented+lora" for p in result.frontier) == bool(
        rec.result.config)
