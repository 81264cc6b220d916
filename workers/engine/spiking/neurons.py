"""The LIF layer: ``gpu_kernels.lif`` (Triton on CUDA, the reference loop on the CPU) as a module
over a leading time axis, with the surrogate gradient that lets backpropagation train through it."""

from __future__ import annotations

import torch
from torch import nn

from gpu_kernels.lif import Reset, Surrogate, lif


class LIF(nn.Module):
    """Leaky integrate-and-fire neurons: input (T, ...) of currents, output (T, ...) of spikes in
    {0, 1}. ``threshold`` may be changed after construction (the converter calibrates it)."""

    def __init__(self, beta: float = 0.5, threshold: float = 1.0, reset: Reset = "subtract",
                 surrogate: Surrogate = "atan", alpha: float = 2.0) -> None:
        super().__init__()
        self.beta, self.reset, self.surrogate, self.alpha = beta, reset, surrogate, alpha
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        # Scaling the current instead of the threshold keeps the kernel's threshold at 1; the
        # spikes are the same, and the surrogate's width follows the threshold.
        th = self.threshold
        return lif(x_seq / th, self.beta, 1.0, self.reset, self.surrogate, self.alpha)  # type: ignore[operator]

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, threshold={float(self.threshold):.3g}, reset={self.reset}, "  # type: ignore[arg-type]
                f"surrogate={self.surrogate}")


def over_time(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a stateless layer to (T, B, ...) by folding time into the batch."""
    t, b = x.shape[:2]
    y: torch.Tensor = module(x.reshape(t * b, *x.shape[2:]))
    return y.reshape(t, b, *y.shape[1:])
