"""Triton kernel of the weight-only quantized matmul. Each program computes a BLOCK_M x BLOCK_N
output tile; per BLOCK_K step it loads the int8 (or packed int4, unpacked with an interleave)
weight tile, subtracts the zero point and multiplies the *integer* tile with ``x`` (integers up to
255 are exact in fp16/bf16), then applies the scale to the partial product. That is exact
because the scale is constant over the tile: per output channel for int8, and BLOCK_K divides
the group for int4.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from gpu_kernels._triton_common import dot


@triton.jit
def _kernel(x_ptr: Any, w_ptr: Any, s_ptr: Any, z_ptr: Any, o_ptr: Any, M: Any, N: Any, K: Any,
            stride_x: Any, stride_w: Any, stride_s: Any, stride_o: Any, GROUP: Any,
            BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, UPCAST: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr) -> None:
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_x + rk[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        if BITS == 8:
            q = tl.load(w_ptr + rn[:, None] * stride_w + rk[None, :],
                        mask=nmask[:, None] & kmask[None, :], other=0).to(tl.float32)
            s = tl.load(s_ptr + rn, mask=nmask, other=0.0)
            if HAS_ZEROS:
                q = q - tl.load(z_ptr + rn, mask=nmask, other=0.0)[:, None]
        else:
            # K is a multiple of the group, hence of BLOCK_K: no mask along K
            rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            byte = tl.load(w_ptr + rn[:, None] * stride_w + rb[None, :], mask=nmask[:, None],
                           other=0)
            q = tl.interleave(byte & 0xF, byte >> 4).to(tl.float32)  # low nibble = even column
            g = k0 // GROUP
            s = tl.load(s_ptr + rn * stride_s + g, mask=nmask, other=0.0)
            if HAS_ZEROS:
                q = q - tl.load(z_ptr + rn * stride_s + g, mask=nmask, other=0.0)[:, None]
            else:
                q = q - 8.0
        part = dot(x, tl.trans(q.to(x_ptr.dtype.element_ty)), UPCAST)
        acc += part * s[None, :]
    tl.store(o_ptr + rm[:, None].to(tl.int64) * stride_o + rn[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def _block_k(bits: int, group_size: int) -> int:
    if bits == 8:
        return 32
    for bk in (64, 32, 16):
        if group_size % bk == 0:
            return bk
    raise ValueError(f"the Triton int4 path needs group_size a multiple of 16, not {group_size}")


def qmatmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
            zeros: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    w = qweight.contiguous() if bits == 8 else qweight.view(torch.uint8).contiguous()
    s = scales.float().contiguous()
    z = s if zeros is None else zeros.float().contiguous()
    if not x.is_cuda:
        bm, bn = 16, 32  # the interpreter: small tiles
    else:
        bm, bn = (16 if m <= 16 else 64), 64
    bk = _block_k(bits, group_size)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _kernel[grid](x, w, s, z, out, m, n, k, x.stride(0), w.stride(0),
                  s.stride(0) if s.dim() > 1 else 0, out.stride(0), group_size, BITS=bits,
                  HAS_ZEROS=zeros is not None, UPCAST=not x.is_cuda, BLOCK_M=bm, BLOCK_N=bn,
                  BLOCK_K=bk)
    return out
