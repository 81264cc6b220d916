"""The torch backends: deployed layers agree with the simulation the search relies on, the
artifact rebuilds the deployed model, and the mixed-precision job runs on ``torch-cpu``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from app.config import Settings
from app.schemas import MixedPrecisionSpec
from app.storage import open_store
from tests import helpers
from tests.helpers import measured
from workers.engine import datasets, mixed_precision, zoo
from workers.engine.backends import torch_runtime
from workers.engine.context import LocalContext, UserError
from workers.engine.quant.fake import simulate
from workers.engine.quant.formats import LayerFormat, parse
from workers.engine.quant.task import quantizable_layers

FAST = {"sensitivity": {"probes": 4, "calibration_samples": 64}, "repeats": 5, "warmup": 1,
        "frontier_points": 3, "batch_size": 64}


def _cases(device: str) -> dict[str, tuple[dict[str, str], float]]:
    """label -> (config, the share of the quantization error left unexplained at most)."""
    cases = {
        # Exact on a Xeon with AMX; 4.7% on a 2-core EPYC (Zen 4: AVX-512 BF16, no AMX,
        # 2026-12-02), whose bf16 kernels sum in another order: too close to 5% to bound there.
        "bf16 everywhere": (dict.fromkeys(("conv1", "conv2", "fc1", "fc2", "fc3"), "bf16"), 0.1),
        # The CPU kernels sum K = 1024 (fc1) in blocks, rounding between them: fc1 alone
        # leaves 5.6% (fp16) and 2.3% (int8-weight) of its error unexplained (Xeon, AMX). The
        # share depends on the weights' last bits: on a 2-core EPYC (2026-12-01) fp16 everywhere
        # left 11.0% with digits-cnn trained on two threads, 17.6% with it trained on one
        # (17.6% again on 2026-12-02). The test prints every case's share under "measured".
        "fp16 everywhere": (dict.fromkeys(("conv1", "conv2", "fc1", "fc2", "fc3"), "fp16"), 0.25),
        "int8 fc2 alone": ({"fc2": "int8"}, 0.05),
        "int8 Linears": (dict.fromkeys(("fc1", "fc2", "fc3"), "int8"), 0.05),
        "int8-weight Linears": (dict.fromkeys(("fc1", "fc2", "fc3"), "int8-weight"), 0.1),
        "int4 fc1, fc2": (dict.fromkeys(("fc1", "fc2"), "int4"), 0.05),
        "mixed": ({"conv1": "bf16", "conv2": "bf16", "fc1": "int8", "fc2": "int4", "fc3": "fp16"},
                  0.05),
    }
    if device == "cuda" and torch.cuda.get_device_capability() >= (8, 9):
        cases["fp8 fc1, fc2"] = (dict.fromkeys(("fc1", "fc2"), "fp8"), 0.05)
    return cases


def _bits(state: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {k: bytes(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            for k, v in state.items()}


def _check_matches_simulation(backend_name: str, shared_store: Path) -> None:
    """Tolerances. Layers computing in bf16 / fp16 round their product once, as the
    simulation does, but the kernels sum in another order, so a rounding can flip: the
    simulation must explain most of the deviation from the float model (||deployed -
    simulated|| <= bound x ||deployed - float||, bounds per case), with >= 99% agreement of
    the predicted class. Measured on a 2-core Xeon with AMX, 2026-11-30: bf16 everywhere
    exact, fp16 everywhere 9.5%, int8-weight 5.8%, int8 (W8A8 per token) ~1e-7."""
    model, _ = zoo.digits_cnn(open_store(Settings(store_url=shared_store.as_uri())))
    layers = quantizable_layers(model)
    backend = torch_runtime.TorchBackend(backend_name, model, layers)
    x = datasets.digits("test").inputs["x"]
    with torch.inference_mode():
        flt = model(x).numpy()
    failed = []
    shares: list[str] = []
    for label, (labels, bound) in _cases(backend.device.type).items():
        cfg = {n: backend.native_format(n, parse(p)) for n, p in labels.items()}
        assert all(backend.supports(n, f) for n, f in cfg.items()), label
        realized = backend.realize(cfg)
        x_before, state = x.clone(), _bits(realized.module.state_dict())
        deployed = realized.run((x,))
        # The layers work in place on their kernels' fresh outputs: never on the input, the
        # weights, or anything the next call reads.
        if not (np.array_equal(realized.run((x,)), deployed) and torch.equal(x, x_before)
                and _bits(realized.module.state_dict()) == state):
            failed.append(f"{label}: a run changed its input, its weights or the next output")
        with simulate(layers, cfg), torch.inference_mode():
            simulated = model(x).numpy()
        quant = np.linalg.norm(deployed - flt)
        assert quant > 0, label  # the quantization is really there
        share = float(np.linalg.norm(deployed - simulated) / quant)
        agree = float((deployed.argmax(1) == simulated.argmax(1)).mean())
        shares.append(f"{label} {share:.2%}")
        if not (share <= bound and agree >= 0.99):  # measure all before failing
            failed.append(f"{label}: unexplained {share:.4f}, agreement {agree:.3f}")
    measured.append(f"{backend_name} vs its simulation on digits-cnn, share of the quantization "
                    f"error unexplained: {', '.join(shares)}")
    assert not failed, failed


def test_torch_cpu_matches_simulation(shared_store: Path) -> None:
    _check_matches_simulation("torch-cpu", shared_store)


@pytest.fixture(scope="module")
def digits_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return helpers.digits_store(request, tmp_path_factory)


@pytest.mark.gpu
def test_torch_cuda_matches_simulation(digits_store: Path) -> None:
    _check_matches_simulation("torch-cuda", digits_store)


def test_deployed_fp32_layers_run_without_tf32() -> None:
    """cuDNN convolutions default to TF32 on GPUs: a realized model runs and is timed with fp32
    as IEEE fp32 (what its simulation assumes), and the global flags come back afterwards."""
    seen: list[tuple[str, str]] = []
    conv = torch.backends.cudnn.conv  # type: ignore[attr-defined]

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
            return x

    before = (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    model = torch_runtime.TorchModel(Probe(), torch.device("cpu"), "torch-cpu", {})
    model.run((torch.zeros(2, 3),))
    model.latency_ms((torch.zeros(2, 3),), warmup=1, repeats=2)
    assert seen and all(s == ("ieee", "ieee") for s in seen), seen
    assert (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before


def test_supports_follows_the_kernels() -> None:
    lin = torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.Conv2d(1, 4, 3))
    backend = torch_runtime.TorchBackend("torch-cpu", lin, quantizable_layers(lin))
    assert backend.supports("0", parse("int8")) and backend.supports("1", parse("bf16"))
    assert not backend.supports("1", parse("int8"))  # no int8 convolution kernel
    assert not backend.supports("0", parse("int4"))  # the CPU int4 kernel tiles 16 outputs
    assert not backend.supports("0", parse("fp8"))  # no fp8 GEMM on CPUs
    assert not backend.supports("0", parse("int8-static"))
    native = backend.native_format("0", parse("int8"))
    assert native.activation_grid == "int8-token" and native.per_channel


def test_tied_weights_do_not_stop_the_artifact() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                                torch.nn.Linear(16, 16))
    model[2].weight = model[0].weight  # tied, as a language model's head and embedding are
    backend = torch_runtime.TorchBackend("torch-cpu", model, quantizable_layers(model))
    deployed = backend.realize({"3": backend.native_format("3", parse("int8"))})
    rebuilt = torch_runtime.load(model, deployed.artifact()[1])
    x = torch.randn(4, 16)
    with torch.inference_mode():
        assert np.array_equal(rebuilt(x).numpy(), deployed.run((x,)))


def test_artifact_rebuilds_the_deployed_model(shared_store: Path) -> None:
    model, _ = zoo.digits_cnn(open_store(Settings(store_url=shared_store.as_uri())))
    layers = quantizable_layers(model)
    backend = torch_runtime.TorchBackend("torch-cpu", model, layers)
    labels = {"conv1": "bf16", "conv2": "fp16", "fc1": "int4", "fc2": "int8", "fc3": "int8-weight"}
    cfg: dict[str, LayerFormat] = {n: backend.native_format(n, parse(p)) for n, p in labels.items()}
    deployed = backend.realize(cfg)
    name, blob = deployed.artifact()
    assert name == "model.safetensors"
    fresh, _ = zoo.digits_cnn(open_store(Settings(store_url=shared_store.as_uri())))
    with torch.no_grad():  # the loader must not read the float weights of quantized layers
        for n in labels:
            layers_fresh = quantizable_layers(fresh)
            layers_fresh[n].weight.mul_(0)  # type: ignore[operator]
    rebuilt = torch_runtime.load(fresh, blob)
    x = datasets.digits("test").inputs["x"][:64]
    with torch.inference_mode():
        assert np.array_equal(rebuilt(x).numpy(), deployed.run((x,)))
    # Quantized layers ship their integer tensors, not float weights.
    from safetensors.torch import load

    tensors = load(blob)
    assert tensors["fc2.qweight"].dtype == torch.int8
    assert tensors["fc1.qweight"].dtype == torch.uint8  # two int4 values per byte
    assert tensors["fc1.qweight"].shape == (256, 512)
    assert deployed.size_bytes < sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.slow
def test_job_on_torch_cpu(tmp_path: Path, shared_store: Path) -> None:
    ctx = LocalContext(tmp_path, store=open_store(Settings(store_url=shared_store.as_uri())))
    spec = MixedPrecisionSpec.model_validate({"model": {"zoo": "digits-cnn"}, **FAST,
                                              "backend": "torch-cpu"})
    res = mixed_precision.run(spec, ctx)
    assert res.backend == "torch-cpu" and res.levels == ["bf16", "int8"]
    assert "bf16:Conv" in res.latency_gate and "bf16:Linear" in res.latency_gate
    assert res.chosen.within_budget and res.baseline in res.frontier
    assert {"model.safetensors", "report.json", "config.json"} <= {
        p.name for p in (ctx.workdir / "artifacts").iterdir()}
    # The artifact is the chosen model: it scores what the report says.
    model, _ = zoo.digits_cnn(ctx.store)
    rebuilt = torch_runtime.load(model, (ctx.workdir / "artifacts" / "model.safetensors")
                                 .read_bytes())
    test = datasets.digits("test").take(spec.eval_samples)
    with torch.inference_mode():
        pred = rebuilt(test.inputs["x"]).argmax(1)
    assert test.labels is not None
    assert float((pred == test.labels).float().mean()) == pytest.approx(
        res.chosen.deployed_metric, abs=1e-9)


@pytest.mark.parametrize(("backend", "level"), [("torch-cpu", "int8-static"),
                                              ("onnxruntime-cpu", "bf16")])
def test_a_level_the_backend_has_no_kernel_for_is_refused_in_the_spec(backend: str,
                                                                      level: str) -> None:
    with pytest.raises(ValidationError, match=f"backend {backend} does not run {level}; its "
                       "precisions are"):
        MixedPrecisionSpec.model_validate({"model": {"zoo": "digits-cnn"}, "backend": backend,
                                           "levels": [level]})
    with pytest.raises(ValidationError, match="int4_group_size 32, 64, 128 or 256"):
        MixedPrecisionSpec.model_validate({"model": {"zoo": "digits-cnn"}, "backend": "torch-cpu",
                                           "levels": ["int4"], "int4_group_size": 48})
    # ORT's blockwise quantizer would fail deep in the job: refused up front, default levels too
    with pytest.raises(ValidationError, match=r"MatMulNBits.*16, 32, 64, 128 or 256"):
        MixedPrecisionSpec.model_validate({"model": {"zoo": "digits-cnn"}, "int4_group_size": 48})
    assert MixedPrecisionSpec.model_validate({"model": {"zoo": "digits-cnn"}, "levels": ["int8"],
                                              "int4_group_size": 48}).int4_group_size == 48


def test_a_level_no_layer_of_the_model_can_take_is_a_user_error(tmp_path: Path,
                                                                 shared_store: Path) -> None:
    """What only the model decides is the engine's to refuse: int4 in groups of 32 fits no
    layer of an uploaded MLP whose layers have 16 and 32 inputs (K % 32 and the CPU kernel's
    16-row tiles: fc1 has K = 16, fc2 has 4 outputs)."""
    from tests.helpers import export_tiny

    ctx = LocalContext(tmp_path, store=open_store(Settings(store_url=shared_store.as_uri())))
    ctx.store.put_file(f"tenants/local/models/mdl_{'a' * 32}/model.pt2",
                       export_tiny(tmp_path / "tiny.pt2"))
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((64, 16)).astype("float32"))
    ctx.store.put_file(f"tenants/local/datasets/dst_{'b' * 32}/data.npz", data)
    spec = MixedPrecisionSpec.model_validate({"model": {"id": "mdl_" + "a" * 32},
                                              "dataset": {"id": "dst_" + "b" * 32}, **FAST,
                                              "backend": "torch-cpu", "levels": ["int4"]})
    with pytest.raises(UserError, match="torch-cpu runs int4 on none of this model's layers"):
        mixed_precision.run(spec, ctx)
    # The same model with the default levels (bf16 -> int8) runs.
    res = mixed_precision.run(spec.model_copy(update={"levels": None}), ctx)
    assert res.levels == ["bf16", "int8"] and res.chosen.within_budget
