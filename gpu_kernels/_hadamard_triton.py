"""Triton FWHT: one program per row of up to MAX_ROW elements, the row in registers, log2(n)
butterfly stages. A stage pairs element i with i XOR h; Triton cannot permute a register tensor
by index, so each stage exchanges partners through the output row in global memory (it stays in
L1/L2 at these sizes) with a barrier around it. Longer rows use H_ab = H_a ⊗ H_b: transform
rows of b, transpose, transform rows of a, transpose back.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

MAX_ROW = 4096  # elements per program (16 KiB of fp32 registers)


@triton.jit
def _kernel(x_ptr: Any, y_ptr: Any, n: Any, LOG_N: tl.constexpr,
            BLOCK: tl.constexpr) -> None:
    row = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    mask = idx < n
    v = tl.load(x_ptr + row * n + idx, mask=mask, other=0.0).to(tl.float32)
    h = 1
    for _ in tl.static_range(LOG_N):
        tl.store(y_ptr + row * n + idx, v, mask=mask)
        tl.debug_barrier()
        partner = tl.load(y_ptr + row * n + (idx ^ h), mask=mask, other=0.0)
        tl.debug_barrier()  # every partner read before the next stage overwrites the row
        v = tl.where((idx & h) == 0, v + partner, partner - v)
        h *= 2
    tl.store(y_ptr + row * n + idx, v, mask=mask)


def _rows(x2: torch.Tensor) -> torch.Tensor:
    """Unnormalized FWHT of the rows of a contiguous fp32 (rows, n) tensor."""
    rows, n = x2.shape
    if n > MAX_ROW:
        b = MAX_ROW
        a = n // b
        y = _rows(x2.reshape(rows * a, b)).reshape(rows, a, b)
        y = _rows(y.transpose(1, 2).reshape(rows * b, a).contiguous())
        return y.reshape(rows, b, a).transpose(1, 2).reshape(rows, n).contiguous()
    y = torch.empty_like(x2)
    if rows:
        _kernel[(rows,)](x2, y, n, LOG_N=int(math.log2(n)), BLOCK=n)
    return y


def fwht(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    n = x.shape[-1]
    y = _rows(x.reshape(-1, n).float().contiguous())
    if normalize:
        y.mul_(1.0 / math.sqrt(n))
    return y.reshape(x.shape).to(x.dtype)
