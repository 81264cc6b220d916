"""Triton LIF: one program per BLOCK neurons, the time loop inside the kernel, so the membrane
stays in registers; the backward walks time in reverse with the same layout."""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _fwd(x_ptr: Any, s_ptr: Any, v_ptr: Any, T: Any, M: Any, beta: Any, thr: Any,
         SUBTRACT: tl.constexpr, BLOCK: tl.constexpr) -> None:
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < M
    M64 = tl.cast(M, tl.int64)  # T x M can pass 2**31 elements; M may be a constexpr (1)
    u = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(0, T):
        x = tl.load(x_ptr + t * M64 + idx, mask=mask, other=0.0).to(tl.float32)
        v = beta * u + x
        s = (v - thr >= 0).to(tl.float32)
        tl.store(v_ptr + t * M64 + idx, v, mask=mask)
        tl.store(s_ptr + t * M64 + idx, s, mask=mask)
        if SUBTRACT:
            u = v - s * thr
        else:
            u = v * (1.0 - s)


@triton.jit
def _bwd(g_ptr: Any, s_ptr: Any, v_ptr: Any, gx_ptr: Any, T: Any, M: Any, beta: Any, thr: Any,
         alpha: Any, SUBTRACT: tl.constexpr, ATAN: tl.constexpr, BLOCK: tl.constexpr) -> None:
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < M
    M64 = tl.cast(M, tl.int64)  # T x M can pass 2**31 elements; M may be a constexpr (1)
    grad_u = tl.zeros((BLOCK,), dtype=tl.float32)  # dL/du_t, flowing back from t + 1
    for i in range(0, T):
        t = T - 1 - i
        g = tl.load(g_ptr + t * M64 + idx, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + t * M64 + idx, mask=mask, other=0.0)
        s = tl.load(s_ptr + t * M64 + idx, mask=mask, other=0.0)
        z = v - thr
        if ATAN:
            k = 1.5707963267948966 * alpha * z
            sg = alpha / 2.0 / (1.0 + k * k)
        else:
            sig = 1.0 / (1.0 + tl.exp(-alpha * z))
            sg = alpha * sig * (1.0 - sig)
        if SUBTRACT:
            du_dv = 1.0
        else:
            du_dv = 1.0 - s
        grad_v = g * sg + grad_u * du_dv
        tl.store(gx_ptr + t * M64 + idx, grad_v, mask=mask)
        grad_u = grad_v * beta


def forward(x_seq: torch.Tensor, beta: float, thr: float, subtract: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    t = x_seq.shape[0]
    x = x_seq.reshape(t, -1).contiguous()
    m = x.shape[1]
    spikes = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    v = torch.empty_like(spikes)
    block = 256
    if m:
        _fwd[(triton.cdiv(m, block),)](x, spikes, v, t, m, beta, thr, SUBTRACT=subtract,
                                       BLOCK=block)
    return spikes.reshape(x_seq.shape), v.reshape(x_seq.shape)


def backward(grad: torch.Tensor, spikes: torch.Tensor, v: torch.Tensor, beta: float, thr: float,
             subtract: bool, atan: bool, alpha: float) -> torch.Tensor:
    t = grad.shape[0]
    g = grad.reshape(t, -1).contiguous()
    m = g.shape[1]
    gx = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    block = 256
    if m:
        _bwd[(triton.cdiv(m, block),)](g, spikes.reshape(t, -1), v.reshape(t, -1), gx, t, m,
                                       beta, thr, alpha, SUBTRACT=subtract, ATAN=atan,
                                       BLOCK=block)
    return gx.reshape(grad.shape)
