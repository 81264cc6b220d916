"""qmatmul: the Triton kernel (interpreted on the CPU) and the torch path against a float64
product with the dequantized weight; the quantizers and the int4 packing by hand."""

from __future__ import annotations

import pytest
import torch

from gpu_kernels.qmatmul import dequantize, qmatmul, quantize_weight, unpack_int4

# Relative error bounds vs float64 (L2): the kernel accumulates in fp32 and returns x's dtype,
# so 16-bit outputs carry its rounding (bf16 2^-9, fp16 2^-12; the interpreter truncates to
# bf16 rather than rounding, hence the margin).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("bits", "symmetric"), [(8, True), (8, False), (4, True), (4, False)])
def test_triton_matches_float64(bits: int, symmetric: bool, dtype: torch.dtype) -> None:
    # (M, K, N, group): M and N ragged for the 16 x 32 tiles; int8's K = 72 is ragged for its
    # BLOCK_K = 32; int4's group 48 gives BLOCK_K = 16 (3 steps per group)
    for m, k, n, group in [(5, 72 if bits == 8 else 96, 70, 48), (17, 64, 33, 32)]:
        gen = torch.Generator().manual_seed(m + bits)
        w = torch.randn(n, k, generator=gen)
        x = torch.randn(3, m, k, generator=gen).to(dtype)  # leading dims are kept
        q, s, z = quantize_weight(w, bits, group, symmetric)  # type: ignore[arg-type]
        assert (z is None) == symmetric
        want = x.double() @ dequantize(q, s, z, bits, group).double().T  # type: ignore[arg-type]
        for impl in ("triton", "torch"):
            got = qmatmul(x, q, s, z, bits, group, impl=impl)  # type: ignore[arg-type]
            assert got.shape == (3, m, n) and got.dtype == dtype
            err = float((got.double() - want).norm() / want.norm())
            assert err <= TOL[dtype], (impl, m, k, n, err)


@pytest.mark.parametrize(("bits", "symmetric"), [(8, True), (8, False), (4, True), (4, False)])
def test_quantization_error_is_half_a_step(bits: int, symmetric: bool) -> None:
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1)) + 0.3  # off-centre
    q, s, z = quantize_weight(w, bits, 32, symmetric)  # type: ignore[arg-type]
    err = (dequantize(q, s, z, bits, 32) - w).abs()  # type: ignore[arg-type]
    step = s[:, None] if bits == 8 else s.repeat_interleave(32, dim=1)
    assert torch.all(err <= step / 2 * (1 + 1e-5))
    if bits == 8:
        assert q.dtype == torch.int8 and s.shape == (16,)
    else:
        assert q.dtype == torch.uint8 and q.shape == (16, 64) and s.shape == (16, 4)
    if not symmetric:  # asymmetric grids use the whole range, so their steps are smaller
        s_sym = quantize_weight(w, bits, 32, True)[1]  # type: ignore[arg-type]
        assert float(s.mean()) < float(s_sym.mean())


def test_int4_packing_by_hand() -> None:
    q = torch.tensor([[0x21, 0xF0]], dtype=torch.uint8)  # columns: 1, 2, 0, 15
    assert unpack_int4(q).tolist() == [[1, 2, 0, 15]]
    w = torch.tensor([[-7.0, 7.0, 0.0, 3.5]])
    packed, s, z = quantize_weight(w, 4, 4)
    assert z is None and float(s) == 1.0
    assert unpack_int4(packed).tolist() == [[1, 15, 8, 12]]  # value + 8; 3.5 rounds to even 4
    with pytest.raises(ValueError, match="multiple"):
        quantize_weight(torch.randn(4, 30), 4, 32)
    with pytest.raises(ValueError, match="input features"):
        qmatmul(torch.randn(2, 8), packed, s, None, 4, 4)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_scales_of_another_layout_are_refused(impl: str) -> None:
    """The Triton kernel reads scales and zeros by offset: scales of another group size (or too
    few channels) used to give a silently wrong product there (and read past the tensor)."""
    w, x = torch.randn(8, 128), torch.randn(2, 128)
    q4, s4, z4 = quantize_weight(w, 4, 32, symmetric=False)
    assert z4 is not None
    with pytest.raises(ValueError, match=r"scales \(8, 4\) do not match"):
        qmatmul(x, q4, s4, z4, 4, 64, impl=impl)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"zeros \(8, 2\) do not match"):
        qmatmul(x, q4, s4, z4[:, :2], 4, 32, impl=impl)  # type: ignore[arg-type]
    q8, s8, _ = quantize_weight(w, 8)
    with pytest.raises(ValueError, match=r"scales \(4,\) do not match.*want \(8,\)"):
        qmatmul(x, q8, s8[:4], None, 8, impl=impl)  # type: ignore[arg-type]
    assert qmatmul(x, q4, s4, z4, 4, 32, impl=impl).shape == (2, 8)  # type: ignore[arg-type]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("bits", [8, 4])
def test_an_empty_batch_gives_an_empty_product(impl: str, bits: int) -> None:
    """A batch of no rows (an empty split, a filtered batch) is (0, ..., out), as in
    ``torch.nn.functional.linear``; it used to fail reshaping to an ambiguous (0, -1)."""
    q, s, z = quantize_weight(torch.randn(8, 32), bits, 16)  # type: ignore[arg-type]
    for lead in [(0,), (2, 0), (0, 3)]:
        out = qmatmul(torch.randn(*lead, 32), q, s, z, bits, 16, impl=impl)  # type: ignore[arg-type]
        assert out.shape == (*lead, 8)


@pytest.mark.gpu
def test_triton_on_cuda() -> None:
    w, x = torch.randn(300, 512), torch.randn(40, 512)
    q, s, z = quantize_weight(w, 4, 128, symmetric=False)
    assert z is not None
    want = x.double() @ dequantize(q, s, z, 4, 128).double().T
    got = qmatmul(x.cuda().half(), q.cuda(), s.cuda(), z.cuda(), 4, 128)
    assert float((got.cpu().double() - want).norm() / want.norm()) < TOL[torch.float16]
