"""Weight-only quantized matmul: ``x @ dequant(qweight).T`` with int8 per-output-channel or int4
group-wise weights, dequantized in registers by the Triton kernel (never as a full matrix).

Layout: ``qweight`` is (out, in) int8 for 8 bits; for 4 bits (out, in // 2) uint8 with two
values per byte (low nibble = even column), stored offset by 8 (value + 8 in [0, 15]).
``scales`` is (out,) for int8 and (out, in // group_size) for int4; symmetric (no zeros).
"""

from __future__ import annotations

from typing import Any

import torch


def quantize_weight(w: torch.Tensor, bits: int = 8, group_size: int = 128
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of a (out, in) weight -> (qweight, scales)."""
    w = w.float()
    if bits == 8:
        scales = w.abs().amax(1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return q, scales
    if bits != 4:
        raise ValueError("bits must be 8 or 4")
    out_f, in_f = w.shape
    if in_f % group_size or group_size % 2:
        raise ValueError(f"in_features {in_f} must be a multiple of group_size {group_size}")
    g = w.reshape(out_f, in_f // group_size, group_size)
    scales = g.abs().amax(2).clamp(min=1e-12) / 7.0
    q = torch.round(g / scales[..., None]).clamp(-8, 7).to(torch.int16).reshape(out_f, in_f) + 8
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    return packed, scales


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int = 128
               ) -> torch.Tensor:
    if bits == 8:
        return qweight.float() * scales[:, None]
    lo = (qweight & 0xF).to(torch.int16) - 8
    hi = (qweight >> 4).to(torch.int16) - 8
    q = torch.stack([lo, hi], dim=2).reshape(qweight.shape[0], -1).float()
    return (q.reshape(q.shape[0], -1, group_size) * scales[..., None]).reshape(q.shape)


def reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int,
              group_size: int = 128) -> torch.Tensor:
    return (x.float() @ dequantize(qweight, scales, bits, group_size).T).to(x.dtype)


def qmatmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int = 8,
            group_size: int = 128, impl: str = "auto") -> torch.Tensor:
    """``x (..., in) @ W.T`` for a quantized ``W (out, in)``. ``impl``: auto (Triton on CUDA,
    else the reference), triton, torch."""
    if impl == "auto":
        impl = "triton" if x.is_cuda else "torch"
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if impl == "torch":
        out = reference(x2, qweight, scales, bits, group_size)
    else:
        from gpu_kernels import _qmatmul_triton

        out = _qmatmul_triton.qmatmul(x2, qweight, scales, bits, group_size)
    return out.reshape(*lead, -1)


__all__: list[Any] = ["dequantize", "qmatmul", "quantize_weight", "reference"]
