"""The digits diffusion teacher: the class-conditional denoiser trained with the v-loss on
scikit-learn's digits (training split, scaled to [-1, 1]); deterministic, cached in the
object store like the other zoo models."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from app.storage import Store
from workers.engine import datasets, zoo
from workers.engine.diffusion.nets import Denoiser
from workers.engine.diffusion.schedule import alpha, col, noised, sigma

TEACHER_VERSION = "v1"
TEACHER_TRAIN: dict[str, Any] = {"seed": 0, "steps": 6000, "batch_size": 256, "lr": 1e-3,
                                 "hidden": 256, "depth": 3}


def digits_flat(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = datasets.digits(split)
    assert d.labels is not None
    return d.inputs["x"].reshape(len(d.labels), -1) * 2 - 1, d.labels


def train_teacher(check: Callable[[int], None] | None = None,
                  device: torch.device | None = None) -> tuple[Denoiser, dict[str, Any]]:
    """Trained on ``device`` (default: the CPU); batches and noise are drawn on the CPU."""
    device = device or torch.device("cpu")
    cfg = TEACHER_TRAIN
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    x, y = (t.to(device) for t in digits_flat("train"))
    model = Denoiser(hidden=cfg["hidden"], depth=cfg["depth"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["steps"])
    t0 = time.perf_counter()
    model.train()
    for step in range(cfg["steps"]):
        if check is not None:
            check(step)
        idx = torch.randint(0, len(x), (cfg["batch_size"],), generator=gen).to(device)
        x0, yb = x[idx], y[idx]
        eps = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.rand(len(x0), generator=gen).to(device)
        # the v-loss: error of the predicted velocity alpha eps - sigma x0
        x_t = noised(x0, eps, t)
        v = col(alpha(t), x0) * eps - col(sigma(t), x0) * x0
        loss = nn.functional.mse_loss(model.velocity(x_t, t, yb), v)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model, {"version": TEACHER_VERSION, "train": cfg,
                   "train_seconds": round(time.perf_counter() - t0, 2)}


def teacher(store: Store | None, check: Callable[[int], None] | None = None,
            device: torch.device | None = None) -> tuple[Denoiser, dict[str, Any]]:
    """The cached teacher on ``device``; trained there on first use (cached apart from the
    CPU-trained one, see ``zoo.cached_training``)."""
    device = device or torch.device("cpu")
    state, meta = zoo.cached_training(f"zoo/digits-diffusion/{TEACHER_VERSION}",
                                      lambda: train_teacher(check, device), store, device)
    model = Denoiser(hidden=TEACHER_TRAIN["hidden"], depth=TEACHER_TRAIN["depth"])
    model.load_state_dict(state)
    return model.to(device).eval(), meta
