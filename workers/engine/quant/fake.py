"""Simulated (fake) quantization in PyTorch, matching the backend's integer arithmetic.

``simulate(model, config)`` swaps each configured layer's weight for its quantize-dequantize
image and, for int8 dynamic layers, quantizes the layer's input per call the way the backend's
kernel is fed (ORT's DynamicQuantizeLinear, or torch's symmetric int8 per token); fp8 layers
scale their input per tensor into e4m3; layers computing in bf16/fp16 have their input and
product rounded to that dtype (the bias is added after, in fp32); int8-static layers compute
on the calibrated uint8 grids the backend chose (input, requantized product, quantized bias,
output). It restores the float
weights on exit, so one model serves every evaluation of a search.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from workers.engine.quant.formats import Grid, LayerFormat, StaticGrids


def _round(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)  # round half to even, as ONNX QuantizeLinear


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def rounded(x: torch.Tensor, compute: str) -> torch.Tensor:
    """``x`` as the product of a layer computing in ``compute`` sees (or returns) it."""
    return x if compute == "fp32" else x.to(DTYPES[compute]).to(x.dtype)


def int8_codes(w: torch.Tensor, reduce_range: bool = False, per_channel: bool = True,
               scale_dtype: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (dim 0 of a torch weight) or per tensor: range
    [-127, 127], or [-64, 64] with ``reduce_range``. ``scale_dtype``: kernels computing in
    bf16 hold the scales in bf16 too. Returns the integers (out, in), float-valued, and the
    scales, (out, 1) or a scalar; the backends store exactly these."""
    qmax = 64.0 if reduce_range else 127.0
    flat = w.reshape(w.shape[0], -1)
    amax = flat.abs().amax(dim=1, keepdim=True) if per_channel else flat.abs().amax()
    scale = rounded(amax.clamp(min=1e-12) / qmax, scale_dtype)
    return _round(flat / scale).clamp(-qmax, qmax), scale


def int8_weight(w: torch.Tensor, reduce_range: bool = False, per_channel: bool = True,
                scale_dtype: str = "fp32") -> torch.Tensor:
    """The weight ``int8_codes`` stands for."""
    q, scale = int8_codes(w, reduce_range, per_channel, scale_dtype)
    return (q * scale).reshape(w.shape).to(w.dtype)


def uint8_dynamic(x: torch.Tensor) -> torch.Tensor:
    """ONNX DynamicQuantizeLinear then dequantize: per-tensor uint8 over [min(x, 0), max(x, 0)]."""
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    if float(scale) == 0.0:
        return x
    return uint8_grid(x, Grid(float(scale), int(_round(-lo / scale).clamp(0, 255))))


def uint8_grid(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear on a fixed (calibrated) uint8 grid."""
    q = (_round(x / grid.scale) + grid.zero_point).clamp(0, 255)
    return ((q - grid.zero_point) * grid.scale).to(x.dtype)


def int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 with a scale per row of features (the last dimension), range
    [-127, 127]: the activations torch's int8 GEMM (``torch._int_mm``) multiplies."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.0
    return (_round(x / scale).clamp(-127, 127) * scale).to(x.dtype)


def fp8_dynamic(x: torch.Tensor) -> torch.Tensor:
    """e4m3 with one scale per tensor, computed per call: the activations of an fp8 GEMM."""
    scale = x.abs().amax().clamp(min=1e-12) / 448.0
    return (x / scale).to(torch.float8_e4m3fn).to(x.dtype) * scale


def int4_codes(w: torch.Tensor, group_size: int, scale_dtype: str = "fp32"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 in blocks of ``group_size`` along the input dimension, as ORT's
    MatMulNBits quantizer (MlasQuantizeBlockwise) makes them: the block's max if its magnitude
    exceeds the min's, else the min (so the negative one on a tie), maps to -8, so scale = that
    element / -8, range [-8, 7]; codes are round-half-up of ``w * (1 / scale)``, which is
    ``roundf(w * (1 / scale) + 8) - 8`` there (not the half-to-even of QuantizeLinear).
    ``scale_dtype``: kernels computing in bf16 hold the scales in bf16 too. Returns the
    integers (out, blocks, group_size), float-valued, zero-padded to whole blocks, and the
    scales (out, blocks, 1)."""
    out_f, in_f = w.shape[0], w.reshape(w.shape[0], -1).shape[1]
    flat = w.reshape(out_f, in_f)
    pad = (-in_f) % group_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    blocks = flat.reshape(out_f, -1, group_size)
    hi, lo = blocks.amax(dim=2, keepdim=True), blocks.amin(dim=2, keepdim=True)
    extreme = torch.where(hi.abs() > lo.abs(), hi, lo)
    scale = extreme / -8.0
    scale = rounded(torch.where(scale == 0, torch.ones_like(scale), scale), scale_dtype)
    y = blocks * (1.0 / scale) + 8.0  # in [0, 16]: roundf's half away from zero is half up
    down = torch.floor(y)
    q = torch.where(y - down >= 0.5, down + 1.0, down)
    return (q.clamp(0, 15) - 8.0), scale


def int4_weight(w: torch.Tensor, group_size: int, scale_dtype: str = "fp32") -> torch.Tensor:
    """The weight ``int4_codes`` stands for."""
    out_f, in_f = w.shape[0], w.reshape(w.shape[0], -1).shape[1]
    q, scale = int4_codes(w, group_size, scale_dtype)
    deq = (q * scale).reshape(out_f, -1)[:, :in_f]
    return deq.reshape(w.shape).to(w.dtype)


def fp8_weight(w: torch.Tensor) -> torch.Tensor:
    """e4m3 with a per-tensor scale to the format's max (448), as fp8 GEMMs are fed."""
    scale = w.abs().amax().clamp(min=1e-12) / 448.0
    return ((w / scale).to(torch.float8_e4m3fn).to(w.dtype)) * scale


def quantize_weight(w: torch.Tensor, fmt: LayerFormat) -> torch.Tensor:
    if fmt.precision == "fp32":
        return w
    if fmt.precision == "int8":
        return int8_weight(w, fmt.reduce_range, fmt.per_channel, fmt.compute)
    if fmt.precision == "int4":
        return int4_weight(w, fmt.group_size, fmt.compute)
    if fmt.precision == "fp8":
        return fp8_weight(w)
    return rounded(w, fmt.precision)


def weight_perturbation(w: torch.Tensor, fmt: LayerFormat) -> float:
    """||Q(W) - W||^2, the quantization noise a format puts on a layer's weight."""
    with torch.no_grad():
        return float((quantize_weight(w, fmt) - w).double().pow(2).sum())


def quantize_input(x: torch.Tensor, fmt: LayerFormat) -> torch.Tensor:
    """A layer's input as its kernel multiplies it (dynamic formats and compute dtypes)."""
    if fmt.precision == "fp8":
        x = fp8_dynamic(x)
    elif fmt.quantizes_activations:
        x = uint8_dynamic(x) if fmt.activation_grid == "uint8-tensor" else int8_per_token(x)
    return rounded(x, fmt.compute_dtype)


def _quantize_input(fmt: LayerFormat):  # type: ignore[no-untyped-def]
    def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (quantize_input(args[0], fmt), *args[1:])

    return hook


def _round_output(fmt: LayerFormat, bias: torch.Tensor | None):  # type: ignore[no-untyped-def]
    """The product comes out of the kernel in the compute dtype; the bias is added after, in
    fp32 (the backends' layers do the same, so the two roundings agree)."""

    def hook(mod: nn.Module, _args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        y = rounded(out, fmt.compute_dtype)
        if bias is None:
            return y
        dim = -1 if isinstance(mod, nn.Linear) else 1
        return y + bias.reshape([-1 if i == dim % y.dim() else 1 for i in range(y.dim())])

    return hook


def _static_input(grids: StaticGrids):  # type: ignore[no-untyped-def]
    def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (uint8_grid(args[0], grids.input), *args[1:])

    return hook


def _static_output(fmt: LayerFormat, grids: StaticGrids):  # type: ignore[no-untyped-def]
    """Recompute the layer the way QLinearConv / QLinearMatMul (+ QLinearAdd) do: integer
    product requantized to a grid, the bias int32 inside Conv or a uint8 tensor added after a
    MatMul, the result on the output grid (which clips at zero where a ReLU was fused)."""

    def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> torch.Tensor:
        x = args[0]  # already on the input grid: forward hooks see the pre-hook's arguments
        w = mod.weight
        assert isinstance(w, torch.Tensor)
        b = mod.bias if isinstance(mod.bias, torch.Tensor) else None
        if isinstance(mod, nn.Linear):
            y = nn.functional.linear(x, w)
            if b is not None:
                assert grids.product is not None and grids.bias is not None
                y = uint8_grid(y, grids.product) + torch.tensor(grids.bias, dtype=y.dtype)
        else:
            assert isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d)
            y = mod._conv_forward(x, w, None)
            if b is not None:  # int32 at scale input_scale * weight_scale, per channel
                # The weight is already on its grid, whose extreme is exactly +-qmax * scale.
                flat = w.reshape(w.shape[0], -1).abs()
                amax = flat.amax(1) if fmt.per_channel else flat.amax().expand(w.shape[0])
                w_scale = amax / (64.0 if fmt.reduce_range else 127.0)
                b_scale = (grids.input.scale * w_scale).clamp(min=1e-30)
                y = y + (_round(b / b_scale) * b_scale).reshape(1, -1, *([1] * (y.dim() - 2)))
        return uint8_grid(y, grids.output)

    return hook


def _set_weight(mod: nn.Module, w: torch.Tensor) -> None:
    """``w`` as ``mod``'s weight: a parameter where the weight is one (frozen if new)."""
    if "weight" in mod._parameters and not isinstance(w, nn.Parameter):
        w = nn.Parameter(w, requires_grad=False)
    mod.weight = w


@contextmanager
def simulate(layers: Mapping[str, nn.Module], config: Mapping[str, LayerFormat]
             ) -> Iterator[None]:
    """Within the block, the layers named in ``config`` compute in their formats.

    Each quantized weight is a new tensor put in the layer's place (the float one is put back
    on exit), not written into the float one: a weight tied to another module (a language
    model's head and its embedding, two tied layers) stays float there, as the backends deploy
    it, and two tied layers in one config cannot leave the float model quantized."""
    saved: dict[str, torch.Tensor] = {}
    saved_bias: dict[str, torch.Tensor] = {}
    hooks = []
    try:
        with torch.no_grad():
            for name, fmt in config.items():
                if fmt.precision == "fp32":
                    continue
                mod = layers[name]
                weight = mod.weight  # type: ignore[union-attr]
                assert isinstance(weight, torch.Tensor)
                saved[name] = weight
                _set_weight(mod, quantize_weight(weight.detach(), fmt))
                if fmt.quantizes_activations or fmt.compute_dtype != "fp32":
                    hooks.append(mod.register_forward_pre_hook(_quantize_input(fmt)))
                if fmt.compute_dtype != "fp32":
                    bias = mod.bias if isinstance(mod.bias, torch.Tensor) else None
                    if bias is not None:  # zeroed for the product, added back by the hook
                        saved_bias[name] = bias.detach().clone()
                        bias.zero_()
                    hooks.append(mod.register_forward_hook(
                        _round_output(fmt, saved_bias.get(name))))
                if fmt.is_static:
                    if fmt.grids is None:
                        raise ValueError(f"{name}: int8-static needs the backend's calibrated "
                                         "grids (backend.native_format)")
                    hooks.append(mod.register_forward_pre_hook(_static_input(fmt.grids)))
                    hooks.append(mod.register_forward_hook(_static_output(fmt, fmt.grids)))
        yield
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for name, w in saved.items():
                _set_weight(layers[name], w)
            for name, b in saved_bias.items():
                layers[name].bias.copy_(b)  # type: ignore[union-attr, operator]
