"""linear_cross_entropy: the chunked path and the Triton kernels (interpreted on the CPU)
against the materialized reference computed in float64."""

from __future__ import annotations

import pytest
import torch

from gpu_kernels.linear_cross_entropy import linear_cross_entropy, reference

# Relative error bounds vs the float64 reference, per input dtype: fp32 accumulates exactly
# enough for 1e-5; 16-bit inputs are rounded before the (fp32-accumulated) matmul.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
SHAPES = [(37, 24, 101), (64, 16, 300), (5, 40, 67)]  # ragged: no multiples of the blocks


def make(n: int, d: int, v: int, dtype: torch.dtype, seed: int = 0, ignore: bool = True
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    e = (torch.randn(n, d, generator=gen) * 0.5).to(dtype)
    c = (torch.randn(v, d, generator=gen) * 0.5).to(dtype)
    t = torch.randint(0, v, (n,), generator=gen)
    if ignore:
        t[::7] = -100
    return e, c, t


def ref64(e: torch.Tensor, c: torch.Tensor, t: torch.Tensor, softcap: float | None,
          reduction: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    e64 = e.double().requires_grad_(True)
    c64 = c.double().requires_grad_(True)
    logits = e64 @ c64.T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = torch.nn.functional.cross_entropy(logits, t, ignore_index=-100, reduction=reduction)
    (loss.sum() if reduction == "none" else loss).backward()
    assert e64.grad is not None and c64.grad is not None
    return loss.detach(), e64.grad, c64.grad


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_reference(impl: str, dtype: torch.dtype, reduction: str) -> None:
    for i, (n, d, v) in enumerate(SHAPES[:2] if impl == "triton" else SHAPES):
        softcap = 5.0 if i == 1 else None
        e, c, t = make(n, d, v, dtype, seed=i)
        want, ge64, gc64 = ref64(e, c, t, softcap, reduction)
        e1, c1 = e.clone().requires_grad_(True), c.clone().requires_grad_(True)
        got = linear_cross_entropy(e1, c1, t, softcap=softcap, reduction=reduction,  # type: ignore[arg-type]
                                   impl=impl, chunk_rows=16, vocab_block=32, filter_eps=0.0)  # type: ignore[arg-type]
        (got.sum() if reduction == "none" else got).backward()
        assert e1.grad is not None and c1.grad is not None
        assert e1.grad.dtype == dtype and c1.grad.dtype == dtype
        tol = TOL[dtype]
        assert rel(got.detach(), want) <= tol, (impl, n, d, v)
        assert rel(e1.grad, ge64) <= tol * 2, (impl, "grad e")
        assert rel(c1.grad, gc64) <= tol * 2, (impl, "grad c")
        if reduction == "none":
            assert torch.all(got.detach()[t == -100] == 0)


def test_reference_impl_and_autograd_shapes() -> None:
    e, c, t = make(12, 8, 20, torch.float32)
    a = linear_cross_entropy(e.reshape(3, 4, 8), c, t.reshape(3, 4), impl="torch")
    b = linear_cross_entropy(e.reshape(3, 4, 8), c, t.reshape(3, 4), impl="chunked")
    assert torch.allclose(a, b, atol=1e-6)
    none = linear_cross_entropy(e.reshape(3, 4, 8), c, t.reshape(3, 4), reduction="none")
    assert none.shape == (3, 4)
    assert torch.allclose(reference(e, c, t), a)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(e, c, t[:5])


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_gradient_filtering_changes_nothing_measurable(impl: str) -> None:
    # Peaked softmax (large logits): most blocks are filtered in bf16.
    e, c, t = make(32, 16, 256, torch.float32, ignore=False)
    e = e * 8
    _, ge64, gc64 = ref64(e, c, t, None, "mean")
    e1, c1 = e.clone().requires_grad_(True), c.clone().requires_grad_(True)
    linear_cross_entropy(e1, c1, t, impl=impl, filter_eps=2.0**-12, chunk_rows=8,  # type: ignore[arg-type]
                         vocab_block=32).backward()
    assert e1.grad is not None and c1.grad is not None
    assert rel(e1.grad, ge64) < 2e-3 and rel(c1.grad, gc64) < 2e-3


def test_chunked_memory_does_not_scale_with_n_times_v() -> None:
    """Peak bytes held by tensors during forward+backward, counted by torch's own CPU
    allocator profiler: the chunked path needs the inputs, their gradients and one
    chunk_rows x vocab_block block, not the N x V logits."""
    from torch.profiler import ProfilerActivity, profile

    n, d, v = 2048, 64, 8192
    e, c, t = make(n, d, v, torch.float32, ignore=False)

    def peak(impl: str) -> int:
        e1, c1 = e.clone().requires_grad_(True), c.clone().requires_grad_(True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            linear_cross_entropy(e1, c1, t, impl=impl, chunk_rows=256, vocab_block=1024).backward()  # type: ignore[arg-type]
        # Each op's *self* allocations (+) and frees (-), replayed in time order.
        running, top = 0, 0
        for ev in sorted(prof.events(), key=lambda ev: ev.time_range.start):
            running += ev.self_cpu_memory_usage
            top = max(top, running)
        return top

    logits_bytes = n * v * 4
    materialized, chunked = peak("torch"), peak("chunked")
    assert materialized >= logits_bytes  # the reference really holds N x V
    assert chunked < logits_bytes / 4, (chunked, logits_bytes)
