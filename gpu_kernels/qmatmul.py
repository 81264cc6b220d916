"""Weight-only quantized matmul ``x @ W.T`` with ``W ≈ (q - zero) * scale``: int8 per output
channel or int4 group-wise along the input dimension; the Triton kernel dequantizes weight
tiles in registers, never the whole matrix.

Layout of a (out, in) weight:
- 8 bits: ``qweight`` (out, in) int8; ``scales`` and ``zeros`` (out,).
- 4 bits: ``qweight`` (out, in // 2) uint8, two values per byte (low nibble = even column),
  each value in [0, 15]; ``scales`` and ``zeros`` (out, in // group_size).
``zeros`` (fp32, integer-valued) is None for symmetric quantization, meaning 0 for int8 and 8
for int4.
"""

from __future__ import annotations

from typing import Literal

import torch

Bits = Literal[4, 8]


def _check(bits: int, in_features: int, group_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, not {bits}")
    if bits == 4 and (group_size < 2 or group_size % 2 or in_features % group_size):
        raise ValueError(f"in_features {in_features} must be a multiple of group_size "
                         f"{group_size}, an even number")


def _check_params(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  bits: int, in_features: int, group_size: int) -> None:
    """``scales`` (and ``zeros``) must have the layout of ``bits`` and ``group_size``: the Triton
    kernel reads them by offset, so a mismatch would read the wrong groups (or out of bounds)."""
    _check(bits, in_features, group_size)
    out_f = qweight.shape[0]
    want = (out_f,) if bits == 8 else (out_f, in_features // group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"{name} {tuple(t.shape)} do not match the {bits}-bit weight "
                             f"({out_f} x {in_features}, group_size {group_size}): want {want}")


def quantize_weight(w: torch.Tensor, bits: Bits = 8, group_size: int = 128,
                    symmetric: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest quantization of a (out, in) weight -> (qweight, scales, zeros)."""
    w = w.float()
    out_f, in_f = w.shape
    _check(bits, in_f, group_size)
    g = w[:, None, :] if bits == 8 else w.reshape(out_f, in_f // group_size, group_size)
    qmax = 127 if bits == 8 else 15
    zeros: torch.Tensor | None
    if symmetric:
        half = 127.0 if bits == 8 else 7.0
        scales = g.abs().amax(2).clamp(min=1e-12) / half
        offset = 0.0 if bits == 8 else 8.0
        q = torch.round(g / scales[..., None]) + offset
        lo = -127.0 if bits == 8 else 0.0
        zeros = None
    else:
        lo_w = g.amin(2).clamp(max=0.0)  # the grid holds 0 exactly (padding, ReLU zeros)
        hi_w = g.amax(2).clamp(min=0.0)
        levels = 255.0 if bits == 8 else 15.0
        scales = ((hi_w - lo_w) / levels).clamp(min=1e-12)
        lo = -128.0 if bits == 8 else 0.0
        zeros = (torch.round(-lo_w / scales) + lo).clamp(lo, qmax)
        q = torch.round(g / scales[..., None]) + zeros[..., None]
    q = q.clamp(lo, qmax).reshape(out_f, in_f)
    if bits == 8:
        return q.to(torch.int8), scales[:, 0], None if zeros is None else zeros[:, 0]
    qi = q.to(torch.uint8)
    return qi[:, 0::2] | (qi[:, 1::2] << 4), scales, zeros


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """(out, in // 2) packed bytes -> (out, in) values in [0, 15] (int16)."""
    b = qweight.view(torch.uint8)
    return torch.stack([b & 0xF, b >> 4], dim=2).reshape(b.shape[0], -1).to(torch.int16)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
               bits: Bits = 8, group_size: int = 128) -> torch.Tensor:
    """The fp32 (out, in) weight the quantized one stands for."""
    if bits == 8:
        z = 0.0 if zeros is None else zeros[:, None].float()
        return (qweight.float() - z) * scales[:, None].float()
    q = unpack_int4(qweight).float()
    out_f, in_f = q.shape
    _check(bits, in_f, group_size)
    z = 8.0 if zeros is None else zeros[..., None].float()
    g = (q.reshape(out_f, in_f // group_size, group_size) - z) * scales[..., None].float()
    return g.reshape(out_f, in_f)


def reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
              zeros: torch.Tensor | None = None, bits: Bits = 8, group_size: int = 128
              ) -> torch.Tensor:
    """Dequantize, then an fp32 matmul (also the CPU path)."""
    w = dequantize(qweight, scales, zeros, bits, group_size)
    return (x.float() @ w.T).to(x.dtype)


def qmatmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
            zeros: torch.Tensor | None = None, bits: Bits = 8, group_size: int = 128,
            impl: Literal["auto", "triton", "torch"] = "auto") -> torch.Tensor:
    """``x (..., in) @ W.T -> (..., out)`` in ``x``'s dtype for a quantized ``W (out, in)``.
    ``impl``: auto (Triton on CUDA, else the reference), triton, torch. Inference only (no
    autograd through the kernel)."""
    in_f = x.shape[-1]
    if qweight.shape[1] * (2 if bits == 4 else 1) != in_f:
        raise ValueError(f"x has {in_f} input features, the {bits}-bit weight "
                         f"{tuple(qweight.shape)} does not match")
    _check_params(qweight, scales, zeros, bits, in_f, group_size)
    if impl == "auto":
        impl = "triton" if x.is_cuda else "torch"
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_f)
    if impl == "torch":
        out = reference(x2, qweight, scales, zeros, bits, group_size)
    elif impl == "triton":
        from gpu_kernels import _qmatmul_triton

        out = _qmatmul_triton.qmatmul(x2, qweight, scales, zeros, bits, group_size)
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    return out.reshape(*lead, qweight.shape[0])  # not -1: ambiguous for an empty batch
