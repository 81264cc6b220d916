from __future__ import annotations

import pytest
import torch

from gpu_kernels.hadamard import fwht, fwht_reference, hadamard_matrix


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("n", [1, 2, 8, 64, 256])
def test_matches_dense_hadamard_in_float64(impl: str, n: int) -> None:
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n))
    want = x.double() @ hadamard_matrix(n).T
    got = fwht(x, normalize=False, impl=impl)
    assert got.shape == x.shape
    assert float((got.double() - want).abs().max() / want.abs().max().clamp(min=1)) < 1e-6


def test_normalized_transform_is_its_own_inverse_and_keeps_norms() -> None:
    x = torch.randn(4, 128, dtype=torch.float64)
    y = fwht_reference(x)
    assert torch.allclose(fwht_reference(y), x)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1))
    assert torch.allclose(fwht(x.float(), impl="triton").double(), y, atol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        fwht_reference(torch.zeros(3, 12))
