"""The non-core jobs (intrinsic dimension, few-step distillation): a spec that would be silently
misread is refused at submit, sample timing waits for the GPU, and the quality table says what
its step counts count."""

from __future__ import annotations

import time

import pytest
import torch
from pydantic import ValidationError

from app.schemas import DatasetRef, IntrinsicDimensionSpec, ModelRef, QualityRow
from workers.engine.diffusion.job import timed
from workers.engine.diffusion.schedule import solve


@pytest.mark.parametrize("model", ["digits-mlp", "digits-cnn"])
def test_a_dataset_for_a_builtin_architecture_is_refused_at_submit(model: str) -> None:
    """The built-in architectures train and measure on digits whatever `dataset` names: the
    spec used to be accepted and the job reported digits figures for the user's data."""
    with pytest.raises(ValidationError, match="dataset: the built-in"):
        IntrinsicDimensionSpec(model=model,  # type: ignore[arg-type]
                               dataset=DatasetRef(id="dst_" + "0" * 32))
    with pytest.raises(ValidationError, match="dataset: the built-in"):
        IntrinsicDimensionSpec(model=model,  # type: ignore[arg-type]
                               dataset=DatasetRef(builtin="digits-test"))
    # still accepted: a built-in architecture alone, an upload with its dataset
    IntrinsicDimensionSpec(model=model)  # type: ignore[arg-type]
    IntrinsicDimensionSpec(model=ModelRef(id="mdl_" + "0" * 32),
                           dataset=DatasetRef(id="dst_" + "0" * 32))


def test_the_teacher_rows_say_how_many_evaluations_their_steps_take() -> None:
    """``solve`` at k DDIM steps evaluates the network k + 1 times (a final denoising at the
    grid's end); the quality table's ``steps`` used to be described as network evaluations
    for every row, which a teacher row's is not."""
    calls = 0

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return x * 0.5

    for k in (1, 2, 4):
        calls = 0
        solve(denoise, torch.zeros(3, 4), k)
        assert calls == k + 1
    description = QualityRow.model_fields["steps"].description or ""
    assert "steps + 1 network evaluations" in description


def test_timed_returns_the_output_and_its_seconds() -> None:
    out, seconds = timed(torch.device("cpu"), torch.add, torch.ones(3), 2)
    assert torch.equal(out, torch.full((3,), 3.0)) and 0 <= seconds < 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sample_timing_waits_for_the_gpu() -> None:
    """CUDA kernels run asynchronously: a clock read right after the call times the launches
    only. The job's ms_per_sample used to be read that way on GPU workers."""
    dev = torch.device("cuda")
    a = torch.randn(4096, 4096, device=dev)

    def work(x: torch.Tensor) -> torch.Tensor:
        for _ in range(40):
            x = x @ a / 64
        return x

    work(a)  # warm-up
    torch.cuda.synchronize(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    work(a)
    end.record()
    end.synchronize()
    gpu_s = start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    work(a)
    launch_s = time.perf_counter() - t0  # what the job used to report
    torch.cuda.synchronize(dev)
    _, seconds = timed(dev, work, a)
    assert launch_s < 0.5 * gpu_s  # the workload is long enough to tell the two apart
    assert seconds >= 0.9 * gpu_s
