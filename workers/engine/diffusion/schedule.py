"""The noise schedule and the probability-flow ODE solver.

Trigonometric variance-preserving schedule on t in [0, 1]: x_t = alpha_t x_0 + sigma_t eps with
alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2) (pure data at 0, pure noise at 1). The
deterministic DDIM step, x_s = alpha_s x0_hat + sigma_s eps_hat with
eps_hat = (x_t - alpha_t x0_hat) / sigma_t, is the PF-ODE's first-order solver, exact wherever
the denoiser's x0_hat stays constant along the step.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

# x0_hat = denoise(x_t, t): t is a tensor of shape [batch]
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def alpha(t: torch.Tensor) -> torch.Tensor:
    return torch.cos(t * (math.pi / 2))


def sigma(t: torch.Tensor) -> torch.Tensor:
    return torch.sin(t * (math.pi / 2))


def col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def noised(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return col(alpha(t), x0) * x0 + col(sigma(t), x0) * eps


def ddim_step(x0_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor
              ) -> torch.Tensor:
    """From x_t at time t to time s < t along the PF-ODE, given the denoiser's x0_hat."""
    eps_hat = (x_t - col(alpha(t), x_t) * x0_hat) / col(sigma(t), x_t).clamp(min=1e-8)
    return col(alpha(s), x_t) * x0_hat + col(sigma(s), x_t) * eps_hat


def grid(n: int, t_min: float = 2e-3) -> torch.Tensor:
    """n + 1 times from 1 down to t_min, uniform in t."""
    return torch.linspace(1.0, t_min, n + 1)


@torch.no_grad()
def solve(denoise: Denoise, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """The teacher's many-step sampler: DDIM over ``steps`` uniform steps, then the final
    denoised estimate."""
    ts = grid(steps)
    x = x_T
    for t, s in itertools.pairwise(ts):
        tt, ss = t.expand(len(x)), s.expand(len(x))
        x = ddim_step(denoise(x, tt), x, tt, ss)
    return denoise(x, ts[-1].expand(len(x)))


def sl_point(x_t: torch.Tensor, x_s: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
             gamma: torch.Tensor) -> torch.Tensor:
    """SLAM's sub-path linear ODE between x_s (time s, nearer the data) and x_t (time t):
    (1 - gamma) (alpha_t / alpha_s) x_s + gamma x_t; gamma = 1 is x_t itself."""
    ratio = col(alpha(t) / alpha(s), x_t)
    g = col(gamma, x_t)
    return (1 - g) * ratio * x_s + g * x_t
