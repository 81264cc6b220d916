"""Fast Walsh-Hadamard transform over the last dimension (a power of two): O(n log n)
butterflies instead of an n x n matrix product. Used by the Fastfood projection of the
intrinsic-dimension job. ``normalize`` scales by 1/sqrt(n), making the transform orthonormal
(and its own inverse)."""

from __future__ import annotations

import math

import torch


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The Sylvester Hadamard matrix (tests only: n x n memory)."""
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def fwht_reference(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """The butterfly in PyTorch: log2(n) passes of (a + b, a - b) on halves."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the last dimension ({n}) must be a power of two")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack([a + b, a - b], dim=2)
        h *= 2
    y = y.reshape(*lead, n)
    return y / math.sqrt(n) if normalize else y


def fwht(x: torch.Tensor, normalize: bool = True, impl: str = "auto") -> torch.Tensor:
    """FWHT of ``x (..., n)``; ``impl``: auto (Triton on CUDA), triton, torch."""
    if impl == "auto":
        impl = "triton" if x.is_cuda else "torch"
    if impl == "torch":
        return fwht_reference(x, normalize)
    from gpu_kernels import _hadamard_triton

    return _hadamard_triton.fwht(x, normalize)
