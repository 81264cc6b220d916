"""Triton kernels of the linear cross-entropy: a log-sum-exp forward and a backward that
recomputes logit blocks, with gradient filtering. Each program owns BLOCK_N rows; it walks the
vocabulary in BLOCK_V blocks and the hidden size in BLOCK_D slices, so only BLOCK_N x BLOCK_V
logits ever exist (in registers). The classifier gradient is accumulated with atomics because
many row blocks touch the same vocabulary rows.

Runs on the GPU, and on the CPU under ``TRITON_INTERPRET=1`` (how the tests check it).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x: Any) -> Any:
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _logits_block(e_ptr: Any, c_ptr: Any, rows: Any, cols: Any, N: Any, V: Any, D: Any,
                  stride_e: Any, stride_c: Any, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                  BLOCK_D: tl.constexpr) -> Any:
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        e = tl.load(e_ptr + rows[:, None] * stride_e + ds[None, :],
                    mask=(rows[:, None] < N) & (ds[None, :] < D), other=0.0)
        c = tl.load(c_ptr + cols[:, None] * stride_c + ds[None, :],
                    mask=(cols[:, None] < V) & (ds[None, :] < D), other=0.0)
        acc += tl.dot(e.to(tl.float32), tl.trans(c.to(tl.float32)))
    return acc


@triton.jit
def _lse_kernel(e_ptr: Any, c_ptr: Any, lse_ptr: Any, N: Any, V: Any, D: Any, stride_e: Any,
                stride_c: Any, softcap: Any, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr) -> None:
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logits_block(e_ptr, c_ptr, rows, cols, N, V, D, stride_e, stride_c,
                          BLOCK_N, BLOCK_V, BLOCK_D)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(cols[None, :] < V, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    tl.store(lse_ptr + rows, m + tl.log(s), mask=rows < N)


@triton.jit
def _backward_kernel(e_ptr: Any, c_ptr: Any, t_ptr: Any, lse_ptr: Any, g_ptr: Any,
                     ge_ptr: Any, gc_ptr: Any, N: Any, V: Any, D: Any, stride_e: Any,
                     stride_c: Any, softcap: Any, filter_eps: Any, HAS_SOFTCAP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_D: tl.constexpr) -> None:
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        raw = _logits_block(e_ptr, c_ptr, rows, cols, N, V, D, stride_e, stride_c,
                            BLOCK_N, BLOCK_V, BLOCK_D)
        z = raw
        if HAS_SOFTCAP:
            z = softcap * _tanh(raw / softcap)
        valid = rmask[:, None] & (cols[None, :] < V)
        p = tl.where(valid, tl.exp(z - lse[:, None]), 0.0)
        is_t = cols[None, :] == tgt[:, None]
        # Gradient filtering: skip the block when every softmax value is below precision and
        # no target falls in it (then its whole contribution rounds away).
        keep = (tl.max(tl.max(p, axis=1), axis=0) >= filter_eps) | (
            tl.sum(tl.sum(is_t.to(tl.int32), axis=1), axis=0) > 0)
        if keep:
            d = (p - is_t.to(tl.float32)) * g[:, None]
            if HAS_SOFTCAP:
                d = d * (1.0 - (z / softcap) * (z / softcap))
            d = tl.where(valid, d, 0.0)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                dmask = ds[None, :] < D
                c = tl.load(c_ptr + cols[:, None] * stride_c + ds[None, :],
                            mask=(cols[:, None] < V) & dmask, other=0.0).to(tl.float32)
                e = tl.load(e_ptr + rows[:, None] * stride_e + ds[None, :],
                            mask=rmask[:, None] & dmask, other=0.0).to(tl.float32)
                ge_ptrs = ge_ptr + rows[:, None] * D + ds[None, :]
                ge = tl.load(ge_ptrs, mask=rmask[:, None] & dmask, other=0.0)
                tl.store(ge_ptrs, ge + tl.dot(d, c), mask=rmask[:, None] & dmask)
                tl.atomic_add(gc_ptr + cols[:, None] * D + ds[None, :], tl.dot(tl.trans(d), e),
                              mask=(cols[:, None] < V) & dmask)


def _blocks(d: int) -> tuple[int, int, int]:
    return 32, 64, 32 if d >= 32 else 16


def lse_forward(e: torch.Tensor, c: torch.Tensor, softcap: float | None) -> torch.Tensor:
    e, c = e.contiguous(), c.contiguous()
    n, d = e.shape
    v = c.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=e.device)
    bn, bv, bd = _blocks(d)
    _lse_kernel[(triton.cdiv(n, bn),)](e, c, lse, n, v, d, e.stride(0), c.stride(0),
                                       float(softcap or 1.0), softcap is not None,
                                       BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd)
    return lse


def backward(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
             g: torch.Tensor, softcap: float | None, filter_eps: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    e, c = e.contiguous(), c.contiguous()
    n, d = e.shape
    v = c.shape[0]
    grad_e = torch.zeros((n, d), dtype=torch.float32, device=e.device)
    grad_c = torch.zeros((v, d), dtype=torch.float32, device=e.device)
    bn, bv, bd = _blocks(d)
    _backward_kernel[(triton.cdiv(n, bn),)](
        e, c, targets.contiguous(), lse, g.contiguous().float(), grad_e, grad_c, n, v, d,
        e.stride(0), c.stride(0), float(softcap or 1.0), float(filter_eps), softcap is not None,
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd)
    return grad_e, grad_c
