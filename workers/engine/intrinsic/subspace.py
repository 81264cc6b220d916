"""Training in a random subspace: only d coordinates are trained, the model's parameters are
theta = theta0 + P d with theta0 its seeded random initialization. The solution is stored as
numbers (model, seeds, projection, d values) and rebuilt bit for bit by :func:`rebuild`."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from workers.engine.intrinsic.projections import Kind, make

ModelFactory = Callable[[], nn.Module]


def init_params(factory: ModelFactory, seed: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model with its seeded random initialization (theta0), parameters by name."""
    torch.manual_seed(seed)
    model = factory()
    return model, {n: p.detach().clone() for n, p in model.named_parameters()}


def flatten(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, p in like.items():
        out[name] = flat[i:i + p.numel()].view_as(p)
        i += p.numel()
    return out


@dataclass
class SubspaceRun:
    d: int
    accuracy: float
    d_vector: torch.Tensor
    seconds: float
    steps: int


@dataclass
class Artifact:
    """Everything needed to rebuild the trained model: a few numbers and d floats."""

    model: str
    theta0_seed: int
    projection: Kind
    projection_seed: int
    D: int
    d: int
    d_vector_b64: str  # float32 little-endian

    @property
    def values(self) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(base64.b64decode(self.d_vector_b64),
                                              dtype="<f4").copy())

    def stored_bytes(self) -> int:
        return 4 * self.d + 64  # the d floats plus the model name, seeds and sizes

    @staticmethod
    def pack(values: torch.Tensor) -> str:
        return base64.b64encode(values.detach().float().numpy().astype("<f4").tobytes()).decode()


def rebuild(art: Artifact, factory: ModelFactory) -> nn.Module:
    """The trained model from its artifact: theta0 from its seed, P from its seed."""
    model, theta0 = init_params(factory, art.theta0_seed)
    proj = make(art.projection, art.D, art.d, art.projection_seed)
    with torch.no_grad():
        theta = flatten(theta0) + proj(art.values)
        for name, value in unflatten(theta, theta0).items():
            model.get_parameter(name).copy_(value)
    return model.eval()


def evaluate(model: nn.Module, params: dict[str, torch.Tensor] | None, x: torch.Tensor,
             y: torch.Tensor) -> float:
    with torch.no_grad():
        out = functional_call(model, params, (x,)) if params is not None else model(x)
    return float((out.argmax(1) == y).float().mean())


def train_subspace(factory: ModelFactory, d: int, kind: Kind, train: tuple[torch.Tensor, torch.Tensor],
                   test: tuple[torch.Tensor, torch.Tensor], epochs: int, lr: float,
                   theta0_seed: int, projection_seed: int, batch_size: int = 64,
                   check: Callable[[], None] | None = None) -> SubspaceRun:
    """Adam on the d coordinates only; returns the test accuracy of theta0 + P d."""
    t0 = time.perf_counter()
    model, theta0 = init_params(factory, theta0_seed)
    flat0 = flatten(theta0)
    proj = make(kind, flat0.numel(), d, projection_seed)
    z = torch.zeros(d, requires_grad=True)
    opt = torch.optim.Adam([z], lr=lr)
    x, y = train
    gen = torch.Generator().manual_seed(theta0_seed)
    steps = 0
    model.train()
    for _ in range(epochs):
        if check is not None:
            check()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            params = unflatten(flat0 + proj(z), theta0)
            loss = nn.functional.cross_entropy(functional_call(model, params, (x[idx],)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    model.eval()
    with torch.no_grad():
        acc = evaluate(model, unflatten(flat0 + proj(z), theta0), *test)
    return SubspaceRun(d, acc, z.detach().clone(), time.perf_counter() - t0, steps)


def train_full(factory: ModelFactory, train: tuple[torch.Tensor, torch.Tensor],
               test: tuple[torch.Tensor, torch.Tensor], epochs: int, lr: float, seed: int,
               batch_size: int = 64) -> float:
    """The baseline: all D parameters trained, same data, epochs and optimizer."""
    model, _ = init_params(factory, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = train
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return evaluate(model, None, *test)
