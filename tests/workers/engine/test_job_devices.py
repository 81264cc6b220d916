"""The training jobs' ``device``: a GPU run uses the Triton kernels (FWHT for Fastfood, the fused
LIF) and agrees with the CPU run of the same seed; a CPU worker refuses ``cuda`` before it trains.
Few-step distillation has no kernel of ours, but its draws are made on the CPU too, so the GPU
run tracks the CPU one.

The ``gpu`` tests run on a GPU machine through scripts/gpu_check.sh (``--noconftest``: no Redis,
no shared store), so they build what they need themselves.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.schemas import FewStepDistillSpec, IntrinsicDimensionSpec, SpikingSpec
from app.storage import open_store
from tests import helpers
from workers.engine import datasets
from workers.engine.context import LocalContext, UserError
from workers.engine.diffusion import job as few_step
from workers.engine.diffusion.distill import DistillConfig, distill, sample
from workers.engine.diffusion.nets import Denoiser
from workers.engine.intrinsic import job as intrinsic
from workers.engine.intrinsic.projections import make
from workers.engine.intrinsic.subspace import init_params, train_subspace
from workers.engine.spiking import convert as conv
from workers.engine.spiking import job as spiking

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this worker has a GPU")


Spec = IntrinsicDimensionSpec | SpikingSpec | FewStepDistillSpec


@no_gpu
@pytest.mark.parametrize("spec", [
    IntrinsicDimensionSpec(grid=[5], epochs=1, device="cuda"),
    SpikingSpec(model="char-rwkv", steps=10, device="cuda"),
    FewStepDistillSpec(iterations=1, device="cuda"),
], ids=["intrinsic_dimension", "spiking", "few_step_distill"])
def test_cuda_on_a_cpu_worker_is_refused_before_training(tmp_path: Path, spec: Spec) -> None:
    runs = {"intrinsic_dimension": intrinsic.run, "spiking": spiking.run,
            "few_step_distill": few_step.run}
    ctx = LocalContext(tmp_path)
    with pytest.raises(UserError, match="asked for device `cuda`, but this worker has no GPU"):
        runs[spec.kind](spec, ctx)  # type: ignore[operator]
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").iterdir())


def _digits(n: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    tr, te = datasets.digits("train"), datasets.digits("test")
    assert tr.labels is not None and te.labels is not None
    return (tr.inputs["x"][:n], tr.labels[:n]), (te.inputs["x"], te.labels)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fastfood", "dense", "sparse"])
def test_projections_on_cuda_equal_the_cpu_ones(kind: str) -> None:
    """One seed, one P on both devices (drawn on the CPU); Fastfood's FWHT is the Triton one."""
    x = torch.randn(300, generator=torch.Generator().manual_seed(0))
    want = make(kind, 55_210, 300, seed=4)(x)  # type: ignore[arg-type]
    got = make(kind, 55_210, 300, seed=4).to(torch.device("cuda"))(x.cuda())  # type: ignore[arg-type]
    assert got.is_cuda
    assert float((got.cpu() - want).norm() / want.norm()) < 1e-5


@pytest.mark.gpu
def test_subspace_training_on_cuda_tracks_the_cpu_run() -> None:
    """Same theta0, P and batch order; only float rounding differs, so after 2 epochs the d
    coordinates and the accuracy stay close."""
    train, test = _digits(512)
    runs = [train_subspace(intrinsic.digits_mlp, 64, "fastfood", train, test, 2, 0.05,
                           theta0_seed=3, projection_seed=4, device=torch.device(dev))
            for dev in ("cpu", "cuda")]
    cpu, gpu = runs
    assert not gpu.d_vector.is_cuda and gpu.steps == cpu.steps
    assert float((gpu.d_vector - cpu.d_vector).norm() / cpu.d_vector.norm()) < 0.05
    assert gpu.accuracy == pytest.approx(cpu.accuracy, abs=0.03)
    _, theta0 = init_params(intrinsic.digits_mlp, 3)  # drawn on the CPU whatever the device
    assert all(not p.is_cuda for p in theta0.values())


def _counted(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """Count the calls of ``module.name``, which still runs: the proof that a job used it."""
    real, calls = getattr(module, name), []

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


@pytest.mark.gpu
def test_intrinsic_dimension_job_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpu_kernels import _hadamard_triton

    fwht_calls = _counted(monkeypatch, _hadamard_triton, "fwht")
    res = intrinsic.run(IntrinsicDimensionSpec(grid=[5, 50, 400, 2000], epochs=3, device="cuda"),
                        LocalContext(tmp_path))
    assert res.environment.device.startswith("cuda") and res.full_accuracy > 0.8
    assert fwht_calls  # Fastfood ran the Triton FWHT
    if res.d_int90 is not None:  # rebuilt on the CPU from the GPU-trained d coordinates
        passing = next(c for c in res.curve if c.d == res.d_int90)
        assert res.rebuilt_accuracy == pytest.approx(passing.accuracy, abs=0.02)


@pytest.fixture(scope="module")
def digits_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return helpers.digits_store(request, tmp_path_factory)


@pytest.mark.gpu
def test_spiking_jobs_on_cuda(tmp_path: Path, digits_store: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """digits-cnn converted and fine-tuned on the GPU (the Triton LIF forward and backward): its
    artifact, loaded on the CPU (the reference LIF), scores what the job reported; char-rwkv
    trains, evaluates and samples on the GPU."""
    from gpu_kernels import _lif_triton

    forward, backward = (_counted(monkeypatch, _lif_triton, f) for f in ("forward", "backward"))
    ctx = LocalContext(tmp_path / "cnn", store=open_store(Settings(store_url=digits_store.as_uri())))
    res = spiking.run(SpikingSpec(model="digits-cnn", epochs=1, device="cuda"), ctx)
    assert res.environment.device.startswith("cuda") and res.quality_gap < 0.05
    assert forward and backward  # fine-tuning went through the fused kernel both ways
    art = ctx.workdir / "artifacts"
    model = spiking.load_bytes((art / "spiking.json").read_bytes(),
                               (art / "spiking.safetensors").read_bytes())
    te = datasets.digits("test")
    assert te.labels is not None
    assert conv.accuracy(model, te.inputs["x"], te.labels) == pytest.approx(res.spiking_quality,
                                                                            abs=0.01)
    lm = spiking.run(SpikingSpec(model="char-rwkv", steps=20, samples=1, sample_length=16,
                                 device="cuda"), LocalContext(tmp_path / "lm"))
    assert lm.environment.device.startswith("cuda") and 0 < lm.twin_quality < 7
    assert len(lm.samples[0].spiking) == 16 and lm.spiking_macs == 0


@pytest.mark.gpu
@pytest.mark.parametrize("student", ["full", "lora"])
def test_distillation_on_cuda_tracks_the_cpu_run(student: str) -> None:
    """Same teacher, draws and LoRA init (drawn on the CPU) on both devices: the students'
    losses and samples agree up to float rounding."""
    torch.manual_seed(0)
    net = Denoiser(dim=64, classes=10, hidden=64, depth=1).eval()
    x0, y = torch.rand(256, 64) * 2 - 1, torch.arange(256) % 10
    cfg = DistillConfig(method="slam", iterations=20, batch_size=64, grid_points=8, skip=8,
                        teacher_substeps=4, student=student)  # type: ignore[arg-type]
    out = []
    for dev in ("cpu", "cuda"):
        teacher = Denoiser(dim=64, classes=10, hidden=64, depth=1).to(dev).eval()
        teacher.load_state_dict(net.state_dict())
        copy = Denoiser(dim=64, classes=10, hidden=64, depth=1).to(dev)
        copy.load_state_dict(net.state_dict())
        trained, info = distill(copy, teacher, x0.to(dev), y.to(dev), cfg)
        out.append((info["final_loss"], sample(trained, y[:40].to(dev), 2, 64, seed=1).cpu()))
    (loss_cpu, x_cpu), (loss_gpu, x_gpu) = out
    assert loss_gpu == pytest.approx(loss_cpu, rel=0.02)
    assert float((x_gpu - x_cpu).norm() / x_cpu.norm()) < 1e-2


@pytest.mark.gpu
def test_few_step_distill_job_on_cuda(tmp_path: Path, digits_store: Path) -> None:
    """The teacher trained on the GPU (cached under its own key), a SLAM student, the samplers
    and the metrics; the student's weights come back as CPU tensors."""
    from safetensors.torch import load_file

    ctx = LocalContext(tmp_path, store=open_store(Settings(store_url=digits_store.as_uri())))
    res = few_step.run(FewStepDistillSpec(methods=["slam"], steps=[1], teacher_steps=8,
                                          iterations=30, samples_per_class=4, device="cuda"), ctx)
    assert res.environment.device.startswith("cuda")
    assert {(r.method, r.steps) for r in res.rows} == {("real", None), ("teacher", 8),
                                                       ("teacher", 1), ("slam", 1)}
    assert all(r.frechet_distance >= 0 for r in res.rows)
    weights = load_file(ctx.workdir / "artifacts" / "student-slam.safetensors")
    assert weights and all(t.device.type == "cpu" for t in weights.values())


def test_a_figure_measured_on_the_cpu_names_no_cuda() -> None:
    from workers.engine import env

    versions = env.environment(torch.device("cpu")).versions
    assert "torch" in versions and "cuda" not in versions and "cudnn" not in versions


@pytest.mark.gpu
def test_a_figure_measured_on_a_gpu_names_cuda_and_cudnn() -> None:
    from workers.engine import env

    versions = env.environment(torch.device("cuda")).versions
    assert versions["cuda"] == torch.version.cuda and versions["cuda"] != "None"
    assert versions["cudnn"] == str(torch.backends.cudnn.version())
