"""Quantization formats as config objects, one per layer (torchao style).

Each format says what it does to a layer's weight and input activations. The arithmetic matches
the kernels of the onnxruntime-cpu backend, so simulated accuracy predicts deployed accuracy:
int8 = ORT dynamic quantization (uint8 asymmetric per-tensor activations computed per call, int8
symmetric per-output-channel weights); int8-static = ORT's QOperator static quantization
(uint8 activations on grids calibrated once, kept in uint8 from one quantized layer to the
next through ReLU / pooling / reshapes, so no per-call quantization); int4 = ORT MatMulNBits
(weight-only, symmetric, blocks of ``group_size`` along the input dimension); fp8/fp16/bf16 =
round trips through those dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Precision = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4"]

# Lower is more aggressive. Bit widths (for sizes and BitOps) per precision.
BITS: dict[str, int] = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4}


@dataclass(frozen=True)
class Grid:
    """A uint8 affine grid: real = (q - zero_point) * scale, q in [0, 255]."""

    scale: float
    zero_point: int


@dataclass(frozen=True)
class StaticGrids:
    """The calibrated grids of one statically quantized layer, as the backend realized them."""

    input: Grid
    output: Grid  # the layer's output, after its bias and a fused ReLU
    product: Grid | None = None  # Linear with bias: x @ W^T is requantized before the bias add
    bias: tuple[float, ...] | None = None  # that bias, as the backend stores it (dequantized)


@dataclass(frozen=True)
class LayerFormat:
    precision: Precision = "fp32"
    group_size: int = 32  # int4 only: weights per scale along the input dimension
    # int8: quantize inputs per call ("dynamic") or on calibrated grids ("static")
    activations: Literal["dynamic", "static", "none"] = "dynamic"
    # int8 on CPUs without VNNI: u8 x s8 products are summed in pairs into int16 and saturate;
    # 7-bit weights ([-64, 64]) keep the sums exact (ORT's reduce_range).
    reduce_range: bool = False
    per_channel: bool = True  # int8 weights: a scale per output channel, else one per tensor
    grids: StaticGrids | None = None  # int8 static: filled in by the backend's calibration

    @property
    def bits(self) -> int:
        return BITS[self.precision]

    @property
    def quantizes_activations(self) -> bool:
        return self.precision == "int8" and self.activations == "dynamic"

    @property
    def is_static(self) -> bool:
        return self.precision == "int8" and self.activations == "static"

    def label(self) -> str:
        if self.precision == "int4":
            return f"int4-g{self.group_size}"
        return "int8-static" if self.is_static else self.precision


FP32 = LayerFormat("fp32")


def parse(name: str, group_size: int = 32) -> LayerFormat:
    """'int8', 'int8-static', 'int4', 'int4-g64', 'fp16', ... -> a format."""
    if name == "int8-static":
        return LayerFormat("int8", activations="static")
    if name.startswith("int4-g"):
        return LayerFormat("int4", group_size=int(name.removeprefix("int4-g")))
    if name not in BITS:
        raise ValueError(f"unknown precision {name!r}; one of {sorted(BITS)} or int8-static")
    return LayerFormat(name, group_size=group_size)  # type: ignore[arg-type]
