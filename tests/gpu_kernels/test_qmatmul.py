from __future__ import annotations

import pytest
import torch

from gpu_kernels.qmatmul import dequantize, qmatmul, quantize_weight


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(5, 64, 33), (17, 128, 70)])  # (M, K, N), ragged M and N
def test_triton_matches_reference_in_float64(bits: int, shape: tuple[int, int, int]) -> None:
    m, k, n = shape
    gen = torch.Generator().manual_seed(m)
    w, x = torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen)
    q, s = quantize_weight(w, bits, group_size=32)
    want = x.double() @ dequantize(q, s, bits, 32).double().T
    got = qmatmul(x, q, s, bits, 32, impl="triton")
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5
    # and the quantization itself is as good as its grid allows
    err = (dequantize(q, s, bits, 32) - w).abs().max()
    assert err <= s.max() / 2 + 1e-6
    assert torch.allclose(qmatmul(x, q, s, bits, 32, impl="torch"), got, atol=1e-4)


def test_int4_packing_round_trip() -> None:
    w = torch.randn(8, 64)
    q, s = quantize_weight(w, 4, 32)
    assert q.dtype == torch.uint8 and q.shape == (8, 32) and s.shape == (8, 2)
    lo, hi = (q & 0xF).to(torch.int16) - 8, (q >> 4).to(torch.int16) - 8
    assert lo.min() >= -8 and hi.max() <= 7
    with pytest.raises(ValueError, match="multiple"):
        quantize_weight(torch.randn(4, 30), 4, 32)
