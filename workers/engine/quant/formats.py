"""Quantization formats as config objects, one per layer (torchao style).

Each format says what it does to a layer's weight and input activations. The arithmetic matches
the kernels of the onnxruntime-cpu backend, so simulated accuracy predicts deployed accuracy:
int8 = ORT dynamic quantization (uint8 asymmetric per-tensor activations computed per call, int8
symmetric per-output-channel weights); int4 = ORT MatMulNBits (weight-only, symmetric, blocks of
``group_size`` along the input dimension); fp8/fp16/bf16 = round trips through those dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Precision = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4"]

# Lower is more aggressive. Bit widths (for sizes and BitOps) per precision.
BITS: dict[str, int] = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4}


@dataclass(frozen=True)
class LayerFormat:
    precision: Precision = "fp32"
    group_size: int = 32  # int4 only: weights per scale along the input dimension
    activations: Literal["dynamic", "none"] = "dynamic"  # int8: quantize inputs per call
    # int8 on CPUs without VNNI: u8 x s8 products are summed in pairs into int16 and saturate;
    # 7-bit weights ([-64, 64]) keep the sums exact (ORT's reduce_range).
    reduce_range: bool = False
    per_channel: bool = True  # int8 weights: a scale per output channel, else one per tensor

    @property
    def bits(self) -> int:
        return BITS[self.precision]

    @property
    def quantizes_activations(self) -> bool:
        return self.precision == "int8" and self.activations == "dynamic"

    def label(self) -> str:
        return f"int4-g{self.group_size}" if self.precision == "int4" else self.precision


FP32 = LayerFormat("fp32")


def parse(name: str, group_size: int = 32) -> LayerFormat:
    """'int8', 'int4', 'int4-g64', 'fp16', ... -> a format."""
    if name.startswith("int4-g"):
        return LayerFormat("int4", group_size=int(name.removeprefix("int4-g")))
    if name not in BITS:
        raise ValueError(f"unknown precision {name!r}; one of {sorted(BITS)}")
    return LayerFormat(name, group_size=group_size)  # type: ignore[arg-type]
