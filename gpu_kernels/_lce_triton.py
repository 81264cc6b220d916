"""Triton kernels of the linear cross-entropy: a log-sum-exp forward and a backward that
recomputes logit blocks, with gradient filtering and an optional vocabulary order.

The grid is (row blocks, vocabulary splits): each program owns BLOCK_N rows and one contiguous
range of BLOCK_V-wide vocabulary blocks, walking the hidden size in BLOCK_D slices, so only
BLOCK_N x BLOCK_V logits ever exist (in registers). Splitting the vocabulary gives the GPU
enough programs when N is small; the forward writes a (running max, running sum) pair per split
that the host combines, the backward accumulates both gradients with fp32 atomics. Matmul tiles
stay in the input dtype (tensor cores for 16-bit) and accumulate in fp32; fp32 uses the exact
"ieee" dot (no TF32), so results match the reference to fp32 rounding.

Runs on the GPU, and on the CPU under ``TRITON_INTERPRET=1`` (how the tests check it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl

from gpu_kernels._triton_common import dot, tanh

if TYPE_CHECKING:
    from gpu_kernels.linear_cross_entropy import FilterStats


@triton.jit
def _logits_block(e_ptr: Any, c_ptr: Any, rows: Any, cols: Any, rmask: Any, cmask: Any, D: Any,
                  stride_e: Any, stride_c: Any, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr) -> Any:
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    # offsets in int64 here and below: N x D or V x D can pass 2**31 elements (1M tokens x 4096)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds[None, :] < D
        e = tl.load(e_ptr + rows[:, None].to(tl.int64) * stride_e + ds[None, :],
                    mask=rmask[:, None] & dmask, other=0.0)
        c = tl.load(c_ptr + cols[:, None].to(tl.int64) * stride_c + ds[None, :],
                    mask=cmask[:, None] & dmask, other=0.0)
        acc += dot(e, tl.trans(c), UPCAST)
    return acc


@triton.jit
def _lse_kernel(e_ptr: Any, c_ptr: Any, m_ptr: Any, s_ptr: Any, colsum_ptr: Any, N: Any, V: Any,
                D: Any, stride_e: Any, stride_c: Any, v_per_split: Any, softcap: Any,
                HAS_SOFTCAP: tl.constexpr, COLSUM: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr) -> None:
    pid_n, pid_v = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = pid_v * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        z = _logits_block(e_ptr, c_ptr, rows, cols, rmask, cmask, D, stride_e, stride_c,
                          UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
        if HAS_SOFTCAP:
            z = softcap * tanh(z / softcap)
        if COLSUM:
            zs = tl.where(rmask[:, None] & cmask[None, :], z, 0.0)
            tl.atomic_add(colsum_ptr + cols, tl.sum(zs, axis=0), mask=cmask)
        z = tl.where(cmask[None, :], z, float("-inf"))
        # online softmax: rescale the running sum to the new running max
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    tl.store(m_ptr + pid_v * N + rows, m, mask=rmask)
    tl.store(s_ptr + pid_v * N + rows, s, mask=rmask)


@triton.jit
def _backward_kernel(e_ptr: Any, c_ptr: Any, t_ptr: Any, lse_ptr: Any, g_ptr: Any,
                     order_ptr: Any, ge_ptr: Any, gc_ptr: Any, count_ptr: Any, N: Any, V: Any,
                     D: Any, stride_e: Any, stride_c: Any, v_per_split: Any, softcap: Any,
                     filter_eps: Any, HAS_SOFTCAP: tl.constexpr, HAS_ORDER: tl.constexpr,
                     COUNT: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr) -> None:
    pid_n, pid_v = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    # The block goes to the dot in the input dtype, so it must not carry the upstream gradient:
    # a mean over 8192 tokens gives 2^-13 per row, and softmax entries times that are fp16
    # subnormals or zero. grad_e applies g per row to the fp32 product; grad_c sums over rows,
    # so its block carries g / max|g| (exact when the rows share g, as a mean gives) and the
    # product is scaled back by max|g|.
    g_max = tl.max(tl.abs(g))
    g_rel = tl.where(g_max > 0, g / g_max, 0.0)
    tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
    v_start = pid_v * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        cmask = offs < V
        if HAS_ORDER:  # visit the vocabulary in the given order (sorted by mean logit)
            cols = tl.load(order_ptr + offs, mask=cmask, other=0)
        else:
            cols = offs
        z = _logits_block(e_ptr, c_ptr, rows, cols, rmask, cmask, D, stride_e, stride_c,
                          UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
        if HAS_SOFTCAP:
            th = tanh(z / softcap)
            z = softcap * th
        valid = rmask[:, None] & cmask[None, :]
        p = tl.where(valid, tl.exp(z - lse[:, None]), 0.0)
        is_t = (cols[None, :] == tgt[:, None]) & valid
        if COUNT:
            tl.atomic_add(count_ptr, 1)
        # Gradient filtering: skip the block when every softmax value is below the threshold
        # and no target falls in it (its whole contribution rounds away).
        keep = (tl.max(p) >= filter_eps) | (tl.max(is_t.to(tl.int32)) > 0)
        if keep:
            d = p - is_t.to(tl.float32)
            if HAS_SOFTCAP:
                d = d * (1.0 - th * th)
            d = tl.where(valid, d, 0.0)
            d_c = (d * g_rel[:, None]).to(e_ptr.dtype.element_ty)
            d = d.to(e_ptr.dtype.element_ty)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                dmask = ds[None, :] < D
                c = tl.load(c_ptr + cols[:, None].to(tl.int64) * stride_c + ds[None, :],
                            mask=cmask[:, None] & dmask, other=0.0)
                e = tl.load(e_ptr + rows[:, None].to(tl.int64) * stride_e + ds[None, :],
                            mask=rmask[:, None] & dmask, other=0.0)
                tl.atomic_add(ge_ptr + rows[:, None].to(tl.int64) * D + ds[None, :],
                              dot(d, c, UPCAST) * g[:, None], mask=rmask[:, None] & dmask)
                tl.atomic_add(gc_ptr + cols[:, None].to(tl.int64) * D + ds[None, :],
                              dot(tl.trans(d_c), e, UPCAST) * g_max,
                              mask=cmask[:, None] & dmask)
        elif COUNT:
            tl.atomic_add(count_ptr + 1, 1)


def _config(e: torch.Tensor, v: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_D, vocabulary splits). Small blocks under the interpreter
    (numpy cost per program); on a GPU enough programs to fill it (untuned)."""
    if not e.is_cuda:
        return 16, 32, 16, 2
    n = e.shape[0]
    bn, bv, bd = 64, 64, 32
    programs = triton.cdiv(n, bn)
    sms = torch.cuda.get_device_properties(e.device).multi_processor_count
    return bn, bv, bd, max(1, min(triton.cdiv(v, bv), triton.cdiv(4 * sms, programs)))


def _splits(v: int, bv: int, want: int) -> tuple[int, int]:
    """Vocabulary columns per split (a multiple of BLOCK_V) and the number of non-empty splits."""
    blocks = triton.cdiv(v, bv)
    per = triton.cdiv(blocks, max(1, min(want, blocks)))
    return per * bv, triton.cdiv(blocks, per)


def lse_forward(e: torch.Tensor, c: torch.Tensor, softcap: float | None,
                colsum: torch.Tensor | None = None) -> torch.Tensor:
    """Log-sum-exp per row (fp32); adds the per-vocabulary sum of logits to ``colsum``."""
    e, c = e.contiguous(), c.contiguous()
    n, d = e.shape
    v = c.shape[0]
    bn, bv, bd, want = _config(e, v)
    per, splits = _splits(v, bv, want)
    m = torch.empty((splits, n), dtype=torch.float32, device=e.device)
    s = torch.empty_like(m)
    dummy = m if colsum is None else colsum
    _lse_kernel[(triton.cdiv(n, bn), splits)](
        e, c, m, s, dummy, n, v, d, e.stride(0), c.stride(0), per, float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None, COLSUM=colsum is not None, UPCAST=not e.is_cuda,
        BLOCK_N=bn, BLOCK_V=bv,
        BLOCK_D=bd)
    return torch.logsumexp(m + s.log(), dim=0)  # combine the splits' partial reductions


def backward(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
             g: torch.Tensor, softcap: float | None, filter_eps: float,
             order: torch.Tensor | None = None, stats: FilterStats | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 gradients w.r.t. e and c; ``targets`` is -1 on ignored rows."""
    e, c = e.contiguous(), c.contiguous()
    n, d = e.shape
    v = c.shape[0]
    grad_e = torch.zeros((n, d), dtype=torch.float32, device=e.device)
    grad_c = torch.zeros((v, d), dtype=torch.float32, device=e.device)
    count = torch.zeros(2, dtype=torch.int32, device=e.device)
    bn, bv, bd, want = _config(e, v)
    per, splits = _splits(v, bv, want)
    _backward_kernel[(triton.cdiv(n, bn), splits)](
        e, c, targets.contiguous(), lse.contiguous(), g.float().contiguous(),
        count if order is None else order.contiguous(), grad_e, grad_c, count, n, v, d,
        e.stride(0), c.stride(0), per, float(softcap or 1.0), float(filter_eps),
        HAS_SOFTCAP=softcap is not None, HAS_ORDER=order is not None, COUNT=stats is not None,
        UPCAST=not e.is_cuda, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd)
    if stats is not None:
        blocks, skipped = count.tolist()
        stats.blocks += blocks
        stats.skipped += skipped
    return grad_e, grad_c
