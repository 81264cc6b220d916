"""Triton FWHT: one program per row, the whole row in registers, log2(n) butterfly stages.
Each stage pairs element i with i XOR h; reading the partner through a gather-free reshape is
not expressible in Triton, so every stage goes through a small scratch row in global memory
(L2-resident for the row sizes used: n <= 2^16)."""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _kernel(x_ptr: Any, y_ptr: Any, n: Any, scale: Any, LOG_N: tl.constexpr,
            BLOCK: tl.constexpr) -> None:
    row = tl.program_id(0)
    idx = tl.arange(0, BLOCK)
    mask = idx < n
    v = tl.load(x_ptr + row * n + idx, mask=mask, other=0.0).to(tl.float32)
    h = 1
    for _ in tl.static_range(LOG_N):
        tl.store(y_ptr + row * n + idx, v, mask=mask)
        tl.debug_barrier()
        partner = tl.load(y_ptr + row * n + (idx ^ h), mask=mask, other=0.0)
        v = tl.where((idx & h) == 0, v + partner, partner - v)
        tl.debug_barrier()
        h *= 2
    tl.store(y_ptr + row * n + idx, v * scale, mask=mask)


def fwht(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the last dimension ({n}) must be a power of two")
    x2 = x.reshape(-1, n).contiguous().float()
    y = torch.empty_like(x2)
    log_n = int(math.log2(n))
    _kernel[(x2.shape[0],)](x2, y, n, 1.0 / math.sqrt(n) if normalize else 1.0, LOG_N=log_n,
                            BLOCK=triton.next_power_of_2(n))
    return y.reshape(x.shape).to(x.dtype)
