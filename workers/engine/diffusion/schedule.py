"""The noise schedule, the probability-flow ODE solver and SLAM's sub-path linear ODE.

Trigonometric variance-preserving schedule on t in [0, 1]: x_t = alpha_t x_0 + sigma_t eps with
alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2) (pure data at 0, pure noise at 1). The
deterministic DDIM step, x_s = alpha_s x0_hat + sigma_s eps_hat with
eps_hat = (x_t - alpha_t x0_hat) / sigma_t, is the PF-ODE's first-order solver, exact wherever
the denoiser's x0_hat stays constant along the step.
"""

from __future__ import annotations

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


T_MIN = 2e-3  # the grid's last time: the solvers end here and take the denoised estimate


def grid(n: int) -> torch.Tensor:
    """n + 1 times from 1 down to T_MIN, uniform in t."""
    return torch.linspace(1.0, T_MIN, n + 1)


def ddim(denoise: Denoise, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, steps: int
         ) -> torch.Tensor:
    """The PF-ODE from x at times t to times s (both [batch]) in ``steps`` equal DDIM steps."""
    for i in range(steps):
        a = t + (s - t) * (i / steps)
        b = t + (s - t) * ((i + 1) / steps)
        x = ddim_step(denoise(x, a), x, a, b)
    return x


@torch.no_grad()
def solve(denoise: Denoise, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """The teacher's many-step sampler: DDIM from t = 1 to T_MIN in ``steps`` uniform steps,
    then the final denoised estimate."""
    ones = torch.ones(len(x_T), dtype=x_T.dtype, device=x_T.device)
    end = ones * T_MIN
    return denoise(ddim(denoise, x_T, ones, end, steps), end)


def sl_point(x_t: torch.Tensor, x_s: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
             gamma: torch.Tensor) -> torch.Tensor:
    """SLAM's sub-path linear ODE between x_s (time s, nearer the data) and x_t (time t):
    (1 - gamma) (alpha_t / alpha_s) x_s + gamma x_t; gamma = 1 is x_t itself."""
    ratio = col(alpha(t) / alpha(s), x_t)
    g = col(gamma, x_t)
    return (1 - g) * ratio * x_s + g * x_t


def sl_sigma(t: torch.Tensor, s: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The noise level the official SLAM code gives the sub-path point x_gamma:
    sqrt((sigma_s alpha_t / alpha_s)^2 + gamma^2 (1 - (alpha_t / alpha_s)^2)), i.e.
    gamma^2 sigma_t^2 + (1 - gamma^2) (alpha_t / alpha_s)^2 sigma_s^2 in variance; sigma_t at
    gamma = 1, the rescaled x_s's own level at gamma = 0."""
    r = alpha(t) / alpha(s)
    return torch.sqrt((sigma(s) * r) ** 2 + gamma**2 * (1 - r**2))


def sl_origin(x_g: torch.Tensor, v: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
              gamma: torch.Tensor) -> torch.Tensor:
    """x0 predicted at the sub-path point x_g from the network's velocity v (taken at time t).

    The official code reads x_g as alpha_t x0 + sl_sigma eps and converts its eps-network's
    output with x0 = (x_g - sl_sigma eps) / alpha_t. Our network predicts v, so this is the same
    reading in v form: normalized to unit variance by rho = sqrt(alpha_t^2 + sl_sigma^2), x0 =
    (alpha_t / rho) (x_g / rho) - (sl_sigma / rho) v, which gives the same x0 as the official form
    whenever v and eps describe the same point (tested). At gamma = 1, rho = 1 and this is the
    ordinary alpha_t x_t - sigma_t v that sampling, CD and the teacher use. Converting v to eps at
    time t first and then dividing by alpha_t would leave the 1 / alpha_t gain on x_g without
    the matching gain on the network's output, and has no finite value at t = 1, where our grid
    starts from pure noise (alpha = 0; DDPM's grid never gets there): on the Gaussian case its
    1-step student stalled near 15% error, this form reaches 6% (tests' case, 3000 iterations).
    At t = 1, x_g = gamma x_t and this is x0 = -v; rho is floored only so that the point
    gamma = 0 there (x_g = 0: no data, no noise) stays finite."""
    a = col(alpha(t).clamp(min=0), x_g)  # cos(pi / 2) is -4e-8 in float32
    sg = col(sl_sigma(t, s, gamma), x_g)
    rho = torch.sqrt(a**2 + sg**2).clamp(min=1e-6)
    return a * x_g / rho**2 - sg / rho * v
