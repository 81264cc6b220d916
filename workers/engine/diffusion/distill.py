"""Few-step students from a teacher's PF-ODE: consistency distillation (CD) and SLAM.

Both sample a data point x0 and a pair of times t > s that lie ``skip`` steps apart on an
N-point grid (s clamped at its end, as LCM does), noise x0 to x_t, and take the teacher's DDIM
steps to x_s; the target is what the
EMA target network (at gamma = 1) says at x_s, and the loss plain MSE on x0 estimates. CD
(Song et al., 2023; LCM's skipping-step form) asks the student at x_t. SLAM (Xu et al., 2024),
as the official code (MCG-NJU/SPLAM, train_splam_distill_sd_wds.py) does it: gamma ~ U[0, 1),
the student sees the sub-path point x_gamma = gamma x_t + (1 - gamma) (alpha_t / alpha_s) x_s at
time t with gamma as an extra condition, and its output is turned into x0 at the point's own
noise level (``schedule.sl_origin``); at gamma = 1 that is x_t and the ordinary x0_hat, which is
what sampling uses. The official LCM boundary scalings c_skip, c_out are not needed: the
v-parameterized network already returns its input at t = 0.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from workers.engine.diffusion.nets import Denoiser, add_lora
from workers.engine.diffusion.schedule import Denoise, ddim, grid, noised, sl_origin, sl_point

Method = Literal["slam", "cd"]
# x0_hat = teacher(x_t, t, y)
Teacher = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DistillConfig:
    method: Method = "slam"
    iterations: int = 2000
    batch_size: int = 256
    lr: float = 2e-4
    grid_points: int = 32
    skip: int = 32  # = grid_points: every t to the grid's end, the long hops where SLAM gains
    teacher_substeps: int = 32  # DDIM steps of the teacher between t and s (LCM: 1)
    ema: float = 0.95
    student: Literal["full", "lora"] = "full"
    rank: int = 8
    seed: int = 0


def labelled(teacher: Teacher, y: torch.Tensor) -> Denoise:
    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return teacher(x, t, y)
    return denoise


def distill(student: Denoiser, teacher: Teacher, x0: torch.Tensor, y: torch.Tensor,
            cfg: DistillConfig, check: Callable[[int], None] | None = None
            ) -> tuple[Denoiser, dict[str, float]]:
    """Train ``student`` (a copy of the teacher network, changed in place; LoRA adapters are
    added first when ``cfg.student == "lora"``) on its device, where ``x0``, ``y`` and the
    teacher must be too. Returns it and ``{"seconds", "final_loss", "trainable_parameters"}``.
    Batches, times and noise are drawn on the CPU, so a seed means the same draws anywhere."""
    device = next(student.parameters()).device
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.student == "lora":
        add_lora(student, cfg.rank, skip=("gamma",))
    target = copy.deepcopy(student).requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    ts = grid(cfg.grid_points).to(device)
    t0 = time.perf_counter()
    loss_v = float("nan")
    student.train()
    for it in range(cfg.iterations):
        if check is not None:
            check(it)
        idx = torch.randint(0, len(x0), (cfg.batch_size,), generator=gen).to(device)
        xb, yb = x0[idx], y[idx]
        # As LCM's and the official SLAM code: t anywhere on the grid, s = skip steps later,
        # clamped at the grid's end (so a long skip still trains the small t that sampling uses).
        n = torch.randint(0, cfg.grid_points, (cfg.batch_size,), generator=gen).to(device)
        t, s = ts[n], ts[(n + cfg.skip).clamp(max=cfg.grid_points)]
        x_t = noised(xb, torch.randn(xb.shape, generator=gen).to(device), t)
        with torch.no_grad():
            x_s = ddim(labelled(teacher, yb), x_t, t, s, cfg.teacher_substeps)
            want = target(x_s, s, yb)
        if cfg.method == "slam":
            gamma = torch.rand(cfg.batch_size, generator=gen).to(device)
            x_g = sl_point(x_t, x_s, t, s, gamma)
            got = sl_origin(x_g, student.velocity(x_g, t, yb, gamma), t, s, gamma)
        else:
            got = student(x_t, t, yb)
        loss = nn.functional.mse_loss(got, want)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_t, p_s in zip(target.parameters(), student.parameters(), strict=True):
                p_t.lerp_(p_s, 1 - cfg.ema)
        loss_v = float(loss.detach())
    student.eval()
    return student, {"seconds": time.perf_counter() - t0, "final_loss": loss_v,
                     "trainable_parameters": float(sum(p.numel() for p in params))}


@torch.no_grad()
def sample(student: Denoiser, y: torch.Tensor, steps: int, dim: int, seed: int) -> torch.Tensor:
    """Consistency sampling in ``steps`` evaluations: denoise pure noise at t = 1, then re-noise
    to t = 1 - j / steps and denoise again. On the student's device (``y`` there too); the noise
    is drawn on the CPU."""
    device = next(student.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(y), dim, generator=gen).to(device)
    ones = torch.ones(len(y), device=device)
    x0: torch.Tensor = student(x, ones, y)
    for j in range(1, steps):
        t = ones * (1 - j / steps)
        x0 = student(noised(x0, torch.randn(x0.shape, generator=gen).to(device), t), t, y)
    return x0
