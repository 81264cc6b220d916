"""Fast Walsh-Hadamard transform over the last dimension (a power of two): log2(n) butterfly
passes, O(n log n), instead of a product with the n x n Sylvester-Hadamard matrix. Used by the
Fastfood projection of the intrinsic-dimension job. ``normalize`` scales by 1/sqrt(n), making
the transform orthonormal and its own inverse. Both paths are differentiable (the transform is
symmetric, so its backward is the transform of the gradient).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The Sylvester-Hadamard matrix, H[i, j] = (-1)^popcount(i & j) (tests: n x n memory)."""
    _check(n)
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _check(n: int) -> None:
    if n < 1 or n & (n - 1):
        raise ValueError(f"the last dimension ({n}) must be a power of two")


def fwht_reference(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """The butterfly in PyTorch (the CPU path): pass h pairs x[i] with x[i + h] inside each
    block of 2h as (a + b, a - b). Half-precision inputs are transformed in fp32, as the Triton
    kernel does: the unnormalized sums grow up to n-fold (fp16 overflows at 65504) and bf16's
    8-bit mantissa would round at every one of the log2(n) stages."""
    n = x.shape[-1]
    _check(n)
    if x.dtype in (torch.float16, torch.bfloat16):
        return fwht_reference(x.float(), normalize).to(x.dtype)
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        y = torch.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], dim=2)
        h *= 2
    y = y.reshape(*lead, n)
    return y / math.sqrt(n) if normalize else y


class _FWHT(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, normalize: bool) -> torch.Tensor:
        from gpu_kernels import _hadamard_triton

        ctx.normalize = normalize
        return _hadamard_triton.fwht(x, normalize)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        from gpu_kernels import _hadamard_triton

        return _hadamard_triton.fwht(grad, ctx.normalize), None


def fwht(x: torch.Tensor, normalize: bool = True,
         impl: Literal["auto", "triton", "torch"] = "auto") -> torch.Tensor:
    """FWHT of ``x (..., n)``; ``impl``: auto (Triton on CUDA, else the butterfly in torch),
    triton, torch. The Triton kernel computes in fp32 whatever the input dtype (a float64 input
    comes back as float64 at fp32 precision, relative error ~1e-7); torch keeps the dtype
    (computing fp16 and bf16 in fp32 too)."""
    _check(x.shape[-1])
    if impl == "auto":
        impl = "triton" if x.is_cuda else "torch"
    if impl == "torch":
        return fwht_reference(x, normalize)
    if impl != "triton":
        raise ValueError(f"unknown implementation {impl!r}")
    out: torch.Tensor = _FWHT.apply(x, normalize)
    return out
