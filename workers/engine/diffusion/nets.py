"""The denoiser (teacher and students) and LoRA adapters.

A class-conditional residual MLP on flattened images, conditioned on the time t and on SLAM's
gamma (the teacher always sees gamma = 1). The gamma branch starts at zero, where the official
SLAM code starts its new gamma projection at random, so that a student copied from the teacher
computes exactly the teacher's function and CD and SLAM start from the same point. It predicts
v = alpha eps - sigma x0, so x0_hat = alpha x_t - sigma v: at t = 0 the output is the input,
which is the consistency models' boundary condition, built in.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from workers.engine.diffusion.schedule import alpha, col, sigma


def fourier(v: torch.Tensor, n: int = 16) -> torch.Tensor:
    freqs = torch.exp(torch.linspace(0, math.log(1000), n, device=v.device))
    arg = v[:, None] * freqs[None] * math.pi
    return torch.cat([arg.sin(), arg.cos()], dim=1)


class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = h + self.fc2(nn.functional.silu(self.fc1(self.norm(h + c))))
        return out


class Denoiser(nn.Module):
    def __init__(self, dim: int = 64, classes: int = 10, hidden: int = 256, depth: int = 3
                 ) -> None:
        super().__init__()
        self.config = {"dim": dim, "classes": classes, "hidden": hidden, "depth": depth}
        self.inp = nn.Linear(dim, hidden)
        self.time = nn.Sequential(nn.Linear(32, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        last = nn.Linear(hidden, hidden)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.gamma = nn.Sequential(nn.Linear(32, hidden), nn.SiLU(), last)
        self.label = nn.Embedding(classes, hidden)
        self.blocks = nn.ModuleList(Block(hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                 gamma: torch.Tensor | None = None) -> torch.Tensor:
        g = torch.ones_like(t) if gamma is None else gamma
        c = self.time(fourier(t)) + self.gamma(fourier(g)) + self.label(y)
        h = self.inp(x_t)
        for block in self.blocks:
            h = block(h, c)
        out: torch.Tensor = self.out(self.norm(h))
        return out

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                gamma: torch.Tensor | None = None) -> torch.Tensor:
        """x0_hat for x_t (batch, dim) at times t (batch,), labels y, gamma (default 1)."""
        v = self.velocity(x_t, t, y, gamma)
        return col(alpha(t), x_t) * x_t - col(sigma(t), x_t) * v


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update: W x + (alpha / r) B A x, B = 0 at start."""

    def __init__(self, base: nn.Linear, rank: int, scale: float = 1.0) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank, self.scale = rank, scale
        # drawn on the CPU (one A per seed on every device), then put beside the frozen weight
        a = torch.randn(rank, base.in_features) / math.sqrt(base.in_features)
        self.A = nn.Parameter(a.to(base.weight.device))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.input_max = 0.0  # largest |input| entry seen (the LoRA-limits paper's norm bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            self.input_max = max(self.input_max, float(x.detach().abs().max()))
        out: torch.Tensor = self.base(x) + (x @ self.A.T @ self.B.T) * (self.scale / self.rank)
        return out

    def delta(self) -> torch.Tensor:
        """The learned update (alpha / r) B A to the frozen weight."""
        return (self.B @ self.A) * (self.scale / self.rank)


def add_lora(model: nn.Module, rank: int, skip: tuple[str, ...] = ()) -> list[str]:
    """Freeze ``model`` and wrap its Linear layers (except under ``skip`` prefixes) with LoRA;
    modules under ``skip`` stay trainable. Returns the wrapped layer names."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not full.startswith(skip):
                setattr(module, child_name, LoRALinear(child, rank))
                wrapped.append(full)
    for name, p in model.named_parameters():
        if name.startswith(skip):
            p.requires_grad_(True)
    return wrapped
