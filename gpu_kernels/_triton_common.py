"""Triton helpers shared by the kernels."""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl


@triton.jit
def dot(a: Any, b: Any, UPCAST: tl.constexpr) -> Any:
    """``a @ b`` accumulated in fp32; fp32 operands use the exact "ieee" product (no TF32).

    Triton 3.9's interpreter multiplies bf16 tiles as their raw uint16 storage, so under it
    (UPCAST) the tiles are upcast first: exact, the same products as the 16-bit tensor-core dot.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def tanh(x: Any) -> Any:
    # Saturates correctly at both ends: exp overflow gives 1, underflow gives -1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
