"""Leaky integrate-and-fire neurons over time with a surrogate gradient (for the spiking job).

    v_t = beta * u_{t-1} + x_t          membrane before firing
    s_t = H(v_t - threshold)            spike (Heaviside forward)
    u_t = v_t - s_t * threshold         reset by subtraction  (or v_t * (1 - s_t): to zero)

Backward uses a surrogate for dH/dv (``atan``: alpha / 2 / (1 + (pi/2 * alpha * x)^2), or
``sigmoid``: alpha * sig(alpha x) (1 - sig(alpha x))) and, as is usual, treats the reset as
detached. ``x_seq`` is (T, ...); returns spikes of the same shape. The decay is given either
as ``beta`` or as a time constant ``tau`` (beta = exp(-1/tau), one step = one time unit).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

Reset = Literal["subtract", "zero"]
Surrogate = Literal["atan", "sigmoid"]


def surrogate_grad(x: torch.Tensor, kind: Surrogate, alpha: float) -> torch.Tensor:
    if kind == "atan":
        return alpha / 2 / (1 + (math.pi / 2 * alpha * x) ** 2)
    sig = torch.sigmoid(alpha * x)
    return alpha * sig * (1 - sig)


class _Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, kind: Surrogate, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.cfg = (kind, alpha)
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (x,) = ctx.saved_tensors
        return grad * surrogate_grad(x, *ctx.cfg), None, None


def lif_reference(x_seq: torch.Tensor, beta: float = 0.9, threshold: float = 1.0,
                  reset: Reset = "subtract", surrogate: Surrogate = "atan", alpha: float = 2.0
                  ) -> torch.Tensor:
    """The CPU path: a Python loop over T; autograd goes through the surrogate spike."""
    if x_seq.shape[0] == 0:
        return x_seq * 0
    u = torch.zeros_like(x_seq[0])
    out = []
    for x in x_seq:
        v = beta * u + x
        s = _Spike.apply(v - threshold, surrogate, alpha)
        u = v - s.detach() * threshold if reset == "subtract" else v * (1 - s.detach())
        out.append(s)
    return torch.stack(out)


class _LIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_seq: torch.Tensor, beta: float, threshold: float, reset: Reset,
                surrogate: Surrogate, alpha: float) -> torch.Tensor:
        from gpu_kernels import _lif_triton

        spikes, v = _lif_triton.forward(x_seq, beta, threshold, reset == "subtract")
        ctx.save_for_backward(spikes, v)
        ctx.cfg = (beta, threshold, reset, surrogate, alpha)
        ctx.x_dtype = x_seq.dtype
        return spikes.to(x_seq.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        from gpu_kernels import _lif_triton

        spikes, v = ctx.saved_tensors
        beta, threshold, reset, surrogate, alpha = ctx.cfg
        gx = _lif_triton.backward(grad, spikes, v, beta, threshold, reset == "subtract",
                                  surrogate == "atan", alpha)
        return gx.to(ctx.x_dtype), None, None, None, None, None


def lif(x_seq: torch.Tensor, beta: float = 0.9, threshold: float = 1.0,
        reset: Reset = "subtract", surrogate: Surrogate = "atan", alpha: float = 2.0,
        impl: Literal["auto", "triton", "torch"] = "auto", *, tau: float | None = None
        ) -> torch.Tensor:
    """Spikes (T, ...) of LIF neurons driven by ``x_seq`` (T, ...), zero initial membrane;
    differentiable through the surrogate; T = 0 gives an empty (0, ...) result. ``impl``: auto
    (Triton on CUDA, else the reference loop over T), triton, torch."""
    if tau is not None:
        if tau <= 0:
            raise ValueError("tau must be positive")
        beta = math.exp(-1.0 / tau)
    if reset not in ("subtract", "zero") or surrogate not in ("atan", "sigmoid"):
        raise ValueError(f"unknown reset {reset!r} or surrogate {surrogate!r}")
    if impl == "auto":
        impl = "triton" if x_seq.is_cuda else "torch"
    if impl not in ("torch", "triton"):
        raise ValueError(f"unknown implementation {impl!r}")
    if x_seq.shape[0] == 0:  # no time steps: no spikes (still differentiable, all empty)
        return x_seq * 0
    if impl == "torch":
        return lif_reference(x_seq, beta, threshold, reset, surrogate, alpha)
    out: torch.Tensor = _LIF.apply(x_seq, beta, threshold, reset, surrogate, alpha)
    return out
