"""Quantization formats as config objects, one per layer (torchao style).

Each format says what it does to a layer's weight and input activations. The arithmetic matches
the kernels of the onnxruntime-cpu backend, so simulated accuracy predicts deployed accuracy:
int8 = ORT dynamic quantization (uint8 asymmetric per-tensor activations computed per call, int8
symmetric per-output-channel weights); int8-static = ORT's QOperator static quantization
(uint8 activations on grids calibrated once, kept in uint8 from one quantized layer to the
next through ReLU / pooling / reshapes, so no per-call quantization); int4 = ORT MatMulNBits
(weight-only, symmetric, blocks of ``group_size`` along the input dimension).
The torch backends (``torch-cpu``, ``torch-cuda``) ask for their own variants through
``native_format``: int8 with symmetric int8 activations per token (``torch._int_mm``),
int8 weight-only, int4 computing in bf16, fp8 e4m3 weights and activations with a scale per
tensor (``torch._scaled_mm``), and bf16/fp16 layers that compute in that dtype.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

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
    # int8 dynamic: ORT's uint8 per tensor over [min, 0, max], or symmetric int8 per token
    # (row of the layer's input), as torch's int8 GEMM is fed.
    activation_grid: Literal["uint8-tensor", "int8-token"] = "uint8-tensor"
    # The dtype the layer's product runs in: its input, output (and int4 scales) are rounded
    # to it. bf16 / fp16 layers always compute in their own dtype.
    compute: Literal["fp32", "bf16", "fp16"] = "fp32"

    @property
    def bits(self) -> int:
        return BITS[self.precision]

    @property
    def quantizes_activations(self) -> bool:
        """Inputs quantized per call: int8 dynamic, and fp8 (scaled per tensor per call)."""
        return (self.precision == "int8" and self.activations == "dynamic") or self.precision == "fp8"

    @property
    def compute_dtype(self) -> str:
        return self.precision if self.precision in ("bf16", "fp16") else self.compute

    @property
    def is_static(self) -> bool:
        return self.precision == "int8" and self.activations == "static"

    @property
    def realizable(self) -> bool:
        """False for static int8 without calibrated grids: the backend's static quantizer
        left that layer float, so there is no such layer to deploy or simulate."""
        return not self.is_static or self.grids is not None

    def label(self) -> str:
        if self.precision == "int4":
            return f"int4-g{self.group_size}"
        if self.precision == "int8" and self.activations == "none":
            return "int8-weight"
        return "int8-static" if self.is_static else self.precision


FP32 = LayerFormat("fp32")


def parse(name: str, group_size: int = 32) -> LayerFormat:
    """'int8', 'int8-static', 'int8-weight', 'int4', 'int4-g64', 'fp16', ... -> a format."""
    if name == "int8-static":
        return LayerFormat("int8", activations="static")
    if name == "int8-weight":
        return LayerFormat("int8", activations="none")
    if name.startswith("int4-g"):
        return LayerFormat("int4", group_size=int(name.removeprefix("int4-g")))
    if name not in BITS:
        raise ValueError(f"unknown precision {name!r}; one of {sorted(BITS)}, int8-static "
                         "or int8-weight")
    return LayerFormat(name, group_size=group_size)  # type: ignore[arg-type]


def to_json(fmt: LayerFormat) -> dict[str, Any]:
    """Every field, calibrated grids included: what a worker computing a piece of the same job
    needs to simulate exactly the layer the job's own worker realized."""
    return asdict(fmt)


def from_json(d: dict[str, Any]) -> LayerFormat:
    g = d.get("grids")
    grids = None if g is None else StaticGrids(
        input=Grid(**g["input"]), output=Grid(**g["output"]),
        product=None if g.get("product") is None else Grid(**g["product"]),
        bias=None if g.get("bias") is None else tuple(g["bias"]))
    return LayerFormat(**{**d, "grids": grids})
