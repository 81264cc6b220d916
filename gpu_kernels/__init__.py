"""Compiled kernels (Triton) for the engine's hot loops, each next to a plain PyTorch reference
of the same function and a CPU path (issue 4):

- ``linear_cross_entropy``: Cut Cross-Entropy, the loss of a linear head without the N x V logits
- ``qmatmul``: weight-only int8 / int4 matmul, dequantizing in registers
- ``hadamard``: the fast Walsh-Hadamard transform (for the Fastfood projection)
- ``lif``: leaky integrate-and-fire neurons over time with a surrogate gradient
- ``loss_bench``: measuring the loss implementations (time, peak memory)

Triton is imported only when a Triton path runs (the ``_*_triton`` modules), so everything here
works on a CPU-only install, and tests can select Triton's interpreter first.
"""

from gpu_kernels.hadamard import fwht
from gpu_kernels.lif import lif
from gpu_kernels.linear_cross_entropy import linear_cross_entropy
from gpu_kernels.qmatmul import dequantize, qmatmul, quantize_weight

__all__ = ["dequantize", "fwht", "lif", "linear_cross_entropy", "qmatmul", "quantize_weight"]
