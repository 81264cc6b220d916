"""fwht: the Triton kernel (interpreted on the CPU) and the torch butterfly against the dense
Sylvester-Hadamard matrix in float64."""

from __future__ import annotations

import math

import pytest
import torch

from gpu_kernels import _hadamard_triton
from gpu_kernels.hadamard import fwht, fwht_reference, hadamard_matrix

# fp32 butterflies: log2(n) additions per output, relative error ~ log2(n) * 2^-24.
TOL = 1e-6


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("n", [1, 2, 8, 256])
def test_matches_dense_hadamard_in_float64(impl: str, normalize: bool, n: int) -> None:
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n))
    want = x.double() @ hadamard_matrix(n).T / (math.sqrt(n) if normalize else 1.0)
    got = fwht(x, normalize=normalize, impl=impl)  # type: ignore[arg-type]
    assert got.shape == x.shape and got.dtype == x.dtype
    assert float((got.double() - want).norm() / want.norm()) < TOL


def test_long_rows_split_by_kronecker_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    # rows longer than one program's MAX_ROW: H_64 = H_8 ⊗ H_8 through two kernel passes
    monkeypatch.setattr(_hadamard_triton, "MAX_ROW", 8)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0))
    want = x.double() @ hadamard_matrix(64).T
    got = fwht(x, normalize=False, impl="triton")
    assert float((got.double() - want).norm() / want.norm()) < TOL


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gradient_is_the_transform_of_the_gradient(impl: str) -> None:
    x = torch.randn(4, 32, dtype=torch.float32, requires_grad=True)
    w = torch.randn(4, 32)
    (fwht(x, impl=impl) * w).sum().backward()  # type: ignore[arg-type]
    assert x.grad is not None
    want = w.double() @ hadamard_matrix(32) / math.sqrt(32)
    assert float((x.grad.double() - want).norm() / want.norm()) < TOL


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_transformed_in_fp32(impl: str, dtype: torch.dtype) -> None:
    # a constant row of 100s: the unnormalized first output, 409,600, is past fp16's 65,504
    # even though the normalized result (6,400) is not; bf16 would round at all 12 stages
    x = torch.full((2, 4096), 100.0).to(dtype)
    x[1] = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 1000).to(dtype)
    want = fwht_reference(x.double())
    got = fwht(x, impl=impl)  # type: ignore[arg-type]
    assert got.dtype == dtype and bool(torch.isfinite(got).all())
    assert got[0, 0] == 6400.0
    # no worse than rounding the exact result to the dtype once
    once = (want.to(dtype).double() - want).abs().max()
    assert float((got.double() - want).abs().max()) <= float(once)
    x.requires_grad_(True)
    fwht(x, impl=impl).float().sum().backward()  # type: ignore[arg-type]
    assert x.grad is not None and x.grad.dtype == dtype and bool(torch.isfinite(x.grad).all())


def test_normalized_transform_is_orthonormal_and_its_own_inverse() -> None:
    x = torch.randn(4, 128, dtype=torch.float64)
    y = fwht_reference(x)
    assert torch.allclose(fwht_reference(y), x)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1))
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.zeros(3, 12))


@pytest.mark.gpu
def test_triton_on_cuda() -> None:
    x = torch.randn(64, 1 << 14)
    want = fwht_reference(x.double())
    got = fwht(x.cuda())
    assert float((got.cpu().double() - want).norm() / want.norm()) < 1e-5
