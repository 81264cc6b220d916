"""Triton kernel of the weight-only quantized matmul: int8 or packed int4 weight tiles are
loaded, unpacked and scaled in registers, then fed to ``tl.dot`` with fp32 accumulation."""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _kernel(x_ptr: Any, w_ptr: Any, s_ptr: Any, o_ptr: Any, M: Any, N: Any, K: Any,
            stride_x: Any, stride_w: Any, stride_s: Any, stride_o: Any, GROUP: Any,
            BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr) -> None:
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_x + rk[None, :],
                    mask=(rm[:, None] < M) & kmask[None, :], other=0.0).to(tl.float32)
        wmask = (rn[:, None] < N) & kmask[None, :]
        if BITS == 8:
            q = tl.load(w_ptr + rn[:, None] * stride_w + rk[None, :], mask=wmask, other=0)
            s = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
            w = q.to(tl.float32) * s[:, None]
        else:
            byte = tl.load(w_ptr + rn[:, None] * stride_w + rk[None, :] // 2, mask=wmask, other=8)
            nib = tl.where((rk[None, :] % 2) == 0, byte & 0xF, byte >> 4)
            s = tl.load(s_ptr + rn[:, None] * stride_s + rk[None, :] // GROUP, mask=wmask,
                        other=0.0)
            w = (nib.to(tl.float32) - 8.0) * s
        acc += tl.dot(x, tl.trans(w))
    tl.store(o_ptr + rm[:, None] * stride_o + rn[None, :], acc,
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def qmatmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int,
            group_size: int) -> torch.Tensor:
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    scales = scales.float().contiguous()
    bm, bn, bk = 16, 32, 32
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _kernel[grid](x, qweight.contiguous(), scales, out, m, n, k, x.stride(0),
                  qweight.stride(0), scales.stride(0) if scales.dim() > 1 else 0, out.stride(0),
                  group_size, BITS=bits, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return out.to(x.dtype)
