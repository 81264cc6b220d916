"""linear_cross_entropy: the chunked path and the Triton kernels (interpreted on the CPU) against
the materialized reference computed in float64, on ragged shapes with ignored targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpu_kernels.linear_cross_entropy import (
    FilterStats,
    default_filter_eps,
    linear_cross_entropy,
    reference,
)

# Relative error bounds (L2 over the tensor) vs the float64 reference on the same (rounded)
# inputs. The loss is computed in fp32 for every input dtype: 1e-5. Gradients are returned in
# the input dtype, so 16-bit ones carry its rounding (bf16: 2^-9 relative, fp16: 2^-12), and the
# Triton path multiplies the softmax-gradient block in the input dtype too (as on tensor cores).
LOSS_TOL = 1e-5
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# (N, D, V), none a multiple of any block size (chunked: 16 x 32 here; Triton: 16 x 32 x 16).
SHAPES = [(37, 24, 101), (50, 40, 67), (5, 17, 300)]


def make(n: int, d: int, v: int, dtype: torch.dtype, seed: int = 0, ignore: bool = True,
         scale: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    e = (torch.randn(n, d, generator=gen) * scale).to(dtype)
    c = (torch.randn(v, d, generator=gen) * 0.5).to(dtype)
    t = torch.randint(0, v, (n,), generator=gen)
    if ignore:
        t[1::4] = -100
    return e, c, t


def ref64(e: torch.Tensor, c: torch.Tensor, t: torch.Tensor, softcap: float | None = None,
          reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    e64, c64 = e.double().requires_grad_(True), c.double().requires_grad_(True)
    logits = e64 @ c64.T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = torch.nn.functional.cross_entropy(logits, t, ignore_index=-100, reduction=reduction)
    # a non-uniform upstream gradient for "none", so per-row weighting is checked too
    w = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64) if reduction == "none" else 1.0
    (loss * w).sum().backward()
    assert e64.grad is not None and c64.grad is not None
    return loss.detach(), e64.grad, c64.grad


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def run(impl: str, e: torch.Tensor, c: torch.Tensor, t: torch.Tensor, reduction: str = "mean",
        **kw: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    e1, c1 = e.clone().requires_grad_(True), c.clone().requires_grad_(True)
    kw = {"chunk_rows": 16, "vocab_block": 32, **kw}
    loss = linear_cross_entropy(e1, c1, t, reduction=reduction, impl=impl, **kw)  # type: ignore[arg-type]
    w = torch.linspace(0.5, 1.5, loss.numel()) if reduction == "none" else 1.0
    (loss * w).sum().backward()
    assert e1.grad is not None and c1.grad is not None
    return loss.detach(), e1.grad, c1.grad


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_reference(impl: str, dtype: torch.dtype, reduction: str) -> None:
    for i, (n, d, v) in enumerate(SHAPES):
        softcap = 3.0 if i == 1 else None  # logits reach ~±10 here: the cap really bends them
        e, c, t = make(n, d, v, dtype, seed=i)
        want, ge64, gc64 = ref64(e, c, t, softcap, reduction)
        got, ge, gc = run(impl, e, c, t, reduction, softcap=softcap, filter_eps=0.0)
        assert ge.dtype == dtype and gc.dtype == dtype
        assert got.shape == want.shape
        assert rel(got, want) <= LOSS_TOL, (impl, n, d, v, rel(got, want))
        assert rel(ge, ge64) <= GRAD_TOL[dtype], (impl, n, d, v, "grad e", rel(ge, ge64))
        assert rel(gc, gc64) <= GRAD_TOL[dtype], (impl, n, d, v, "grad c", rel(gc, gc64))
        if reduction == "none":
            assert torch.all(got[t == -100] == 0) and torch.all(got[t != -100] > 0)



@pytest.mark.parametrize("rows", ["mean", "none"])
def test_triton_fp16_backward_keeps_small_upstream_gradients(rows: str) -> None:
    """A mean over 8192 tokens hands each row 2^-13: softmax entries ~1e-2 times that are
    fp16 subnormals (or zero), so the block fed to the tensor-core dot must not carry the
    upstream gradient. Checked on the kernel's fp32 gradients, before the cast back to fp16:
    they carry one fp16 rounding of the softmax block (2^-11 relative), bound 1e-3."""
    from gpu_kernels import _lce_triton

    n, d, v = 37, 24, 101
    e, c, t = make(n, d, v, torch.float16, seed=5)
    t = torch.where(t == -100, torch.zeros_like(t), t)
    g64 = torch.full((n,), 2.0**-13, dtype=torch.float64)
    if rows == "none":  # per-row weights spanning 100x, as a weighted loss gives
        g64 = g64 * torch.logspace(0, -2, n, dtype=torch.float64)
    e64, c64 = e.double().requires_grad_(True), c.double().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(e64 @ c64.T, t, reduction="none")
    (loss * g64).sum().backward()
    assert e64.grad is not None and c64.grad is not None
    lse = _lce_triton.lse_forward(e, c, None)
    ge, gc = _lce_triton.backward(e, c, t, lse, g64.float(), None, 0.0)
    assert rel(ge, e64.grad) <= 1e-3, rel(ge, e64.grad)
    assert rel(gc, c64.grad) <= 1e-3, rel(gc, c64.grad)

@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_gradient_filtering_and_vocabulary_sorting(impl: str) -> None:
    """Peaked softmax (large logits): most blocks fall under the bf16 threshold and are skipped;
    visiting the vocabulary by decreasing mean logit skips more, and neither moves the
    gradients beyond the threshold's size."""
    n, d, v, high = 48, 16, 512, 40
    gen = torch.Generator().manual_seed(3)
    u = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    e = torch.randn(n, d, generator=gen) * 0.5 + 3 * u
    c = torch.randn(v, d, generator=gen) * 0.2
    # `high` entries score ~12 for every row (the rest ~0), scattered over the first half of
    # the vocabulary: unsorted, only the second half's blocks can be skipped
    where = torch.randperm(v // 2, generator=gen)[:high]
    c[where] = 4 * u + torch.randn(high, d, generator=gen) * 0.5
    t = where[torch.randint(0, high, (n,), generator=gen)]
    _, ge64, gc64 = ref64(e, c, t)
    eps = default_filter_eps(torch.bfloat16)
    plain, by_mean = FilterStats(), FilterStats()
    _, ge, gc = run(impl, e, c, t, filter_eps=eps, stats=plain)
    _, ge_s, gc_s = run(impl, e, c, t, filter_eps=eps, sort_vocab=True, stats=by_mean)
    assert plain.blocks == by_mean.blocks > 0
    assert 0 < plain.skipped < by_mean.skipped < by_mean.blocks, (plain, by_mean)
    for a, b in ((ge, ge64), (gc, gc64), (ge_s, ge64), (gc_s, gc64)):
        # skipped entries are each < eps / n after the mean's 1/n: bounded by eps overall
        assert float((a.double() - b).abs().max()) < eps
        assert rel(a, b) < 1e-3
    none = FilterStats()
    run(impl, e, c, t, filter_eps=0.0, stats=none)
    assert none.skipped == 0 and none.blocks == plain.blocks


def test_default_filter_eps_follows_the_paper() -> None:
    assert default_filter_eps(torch.bfloat16) == 2.0**-12
    assert default_filter_eps(torch.float16) == 2.0**-15
    assert default_filter_eps(torch.float32) == 2.0**-28


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_one_input_without_grad_and_no_grad_mode(impl: str) -> None:
    e, c, t = make(20, 16, 70, torch.float32)
    _, ge64, _ = ref64(e, c, t)
    e1 = e.clone().requires_grad_(True)
    linear_cross_entropy(e1, c, t, impl=impl).backward()  # type: ignore[arg-type]
    assert e1.grad is not None and rel(e1.grad, ge64) < 1e-5
    with torch.no_grad():
        loss = linear_cross_entropy(e, c, t, impl=impl, sort_vocab=True)  # type: ignore[arg-type]
    assert not loss.requires_grad and rel(loss, ref64(e, c, t)[0]) < 1e-5


def test_api_shapes_auto_and_errors() -> None:
    e, c, t = make(12, 8, 20, torch.float32)
    a = linear_cross_entropy(e.reshape(3, 4, 8), c, t.reshape(3, 4), impl="torch")
    b = linear_cross_entropy(e.reshape(3, 4, 8), c, t.reshape(3, 4))  # auto: chunked on CPU
    assert rel(b, a) < 1e-6 and rel(reference(e, c, t), a) < 1e-7
    assert linear_cross_entropy(e.reshape(3, 4, 8), c, t.reshape(3, 4), reduction="none").shape \
        == (3, 4)
    all_ignored = torch.full_like(t, -100)
    assert float(linear_cross_entropy(e, c, all_ignored)) == 0.0
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(e, c, t[:5])
    with pytest.raises(ValueError, match="classifier"):
        linear_cross_entropy(e, c[:, :5], t)
    with pytest.raises(ValueError, match="implementation"):
        linear_cross_entropy(e, c, t, impl="cuda")  # type: ignore[arg-type]


@pytest.mark.parametrize("impl", ["torch", "chunked", "triton"])
def test_int32_targets_and_all_ignored_mean_agree_across_paths(impl: str) -> None:
    """The three paths are one function: int32 targets work on each (the reference used to
    refuse them), and a mean over no target is 0 with zero gradients on each (the reference
    used to return NaN where the fused paths return 0)."""
    e, c, t = make(9, 12, 40, torch.float32, seed=5)
    for reduction in ("mean", "sum", "none"):
        want, ge64, gc64 = ref64(e, c, t, reduction=reduction)
        got, ge, gc = run(impl, e, c, t.to(torch.int32), reduction, filter_eps=0.0)
        assert rel(got, want) <= LOSS_TOL and rel(ge, ge64) <= 1e-5 and rel(gc, gc64) <= 1e-5
        got, ge, gc = run(impl, e, c, torch.full((9,), -100, dtype=torch.int32), reduction)
        assert torch.all(got == 0), (reduction, got)
        assert torch.all(ge == 0) and torch.all(gc == 0), reduction


@pytest.mark.parametrize("impl", ["torch", "chunked", "triton"])
def test_targets_outside_the_vocabulary_are_a_clear_error(impl: str) -> None:
    """A negative target other than ignore_index used to wrap around to the last classifier
    row (a silently wrong loss); one >= V was an IndexError from deep inside (a device-side
    assert on CUDA)."""
    e, c, t = make(6, 8, 20, torch.float32, ignore=False)
    for bad in (-1, 20, 1000):
        t2 = t.clone()
        t2[3] = bad
        with pytest.raises(ValueError, match=f"target {bad} \\(position 3\\) is outside"):
            linear_cross_entropy(e, c, t2, impl=impl)  # type: ignore[arg-type]
    t2 = t.clone()
    t2[3] = -1  # fine where -1 is the ignored index
    a = linear_cross_entropy(e, c, t2, ignore_index=-1, impl=impl)  # type: ignore[arg-type]
    b = linear_cross_entropy(e[t2 != -1], c, t2[t2 != -1], impl="torch")
    assert rel(a, b) < 1e-6
    with pytest.raises(ValueError, match="integer class indices"):
        linear_cross_entropy(e, c, t.float(), impl=impl)  # type: ignore[arg-type]
    # softcap 0 used to mean "no cap" in the Triton kernel and a constant 0 logit elsewhere
    with pytest.raises(ValueError, match="softcap must be positive"):
        linear_cross_entropy(e, c, t, softcap=0.0, impl=impl)  # type: ignore[arg-type]


def test_triton_kernels_really_run_interpreted_on_cpu() -> None:
    """Guards the set-up: without CUDA the kernels must be the interpreter's, not compiled ones
    (which would fail with no driver) and not silently replaced by the torch path."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present: kernels are compiled")
    from triton.runtime.interpreter import InterpretedFunction

    from gpu_kernels import _hadamard_triton, _lce_triton, _lif_triton, _qmatmul_triton

    for kernel in (_lce_triton._lse_kernel, _lce_triton._backward_kernel, _qmatmul_triton._kernel,
                   _hadamard_triton._kernel, _lif_triton._fwd, _lif_triton._bwd):
        assert isinstance(kernel, InterpretedFunction)


def _peak_allocated(fn: object, tmp: Path) -> int:
    """Peak bytes held by the CPU allocator while ``fn`` runs, above the amount at its start.

    torch's profiler with profile_memory=True records every allocation and free of c10's CPU
    allocator as a "[memory]" event carrying the allocator's running total ("Total Allocated");
    the peak of that series minus its value before the first event is what ``fn`` added."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()  # type: ignore[operator]
    trace = tmp / "trace.json"
    prof.export_chrome_trace(str(trace))
    mem = [ev["args"] for ev in json.loads(trace.read_text())["traceEvents"]
           if ev.get("name") == "[memory]"]
    assert mem, "the profiler recorded no allocations"
    start = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return int(max(m["Total Allocated"] for m in mem) - start)


def test_chunked_memory_does_not_scale_with_n_times_v(tmp_path: Path) -> None:
    n, d, rows, vb = 1024, 32, 128, 512
    block = rows * vb * 4

    def peak(impl: str, v: int) -> int:
        e, c, t = make(n, d, v, torch.float32, ignore=False)
        e.requires_grad_(True)
        c.requires_grad_(True)

        def step() -> None:
            linear_cross_entropy(e, c, t, impl=impl, chunk_rows=rows,  # type: ignore[arg-type]
                                 vocab_block=vb, softcap=20.0).backward()

        return _peak_allocated(step, tmp_path)

    for v in (4096, 16384):
        grads = (n + v) * d * 4
        materialized, chunked = peak("torch", v), peak("chunked", v)
        assert materialized >= 2 * n * v * 4  # the reference really holds N x V (twice)
        # chunked: the gradients, a gathered N x D copy, two N x D row-chunk buffers and a
        # handful of blocks (logits, tanh derivative, temporaries) -- no N x V term
        assert chunked <= grads + 3 * n * d * 4 + 6 * block, (v, chunked, grads)
    # and growing V four times grows the chunked peak by the classifier gradient only
    grow = peak("chunked", 16384) - peak("chunked", 4096)
    assert grow <= (16384 - 4096) * d * 4 + 2 * block, grow


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_on_cuda_matches_reference(dtype: torch.dtype) -> None:
    e, c, t = make(1000, 256, 5000, dtype)
    want, ge64, gc64 = ref64(e, c, t, softcap=20.0)
    got, ge, gc = run("triton", e.cuda(), c.cuda(), t.cuda(), softcap=20.0, filter_eps=0.0,
                      sort_vocab=True)
    assert rel(got.cpu(), want) <= LOSS_TOL
    assert rel(ge.cpu(), ge64) <= GRAD_TOL[dtype] and rel(gc.cpu(), gc64) <= GRAD_TOL[dtype]
