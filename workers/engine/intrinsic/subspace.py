"""Training in a random subspace: only d coordinates are trained, the model's parameters are
theta = theta0 + P d with theta0 its seeded random initialization. The solution is stored as
numbers (model, seeds, projection, d values) and rebuilt bit for bit by :func:`rebuild`.

With ``layer_scaling`` (the structure-aware variant of Aghajanyan et al., 2020), each parameter
tensor i also learns a scalar lambda_i: theta_i = theta0_i + lambda_i (P d)_i, so m more numbers
are trained and stored (m = the number of parameter tensors).

Buffers that training changes (BatchNorm's running statistics, which train mode updates and eval
mode reads) are not in theta and no seed redraws them: the few that changed are stored with the
artifact, else the rebuilt model would normalize with its initial statistics."""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from workers.engine.intrinsic.projections import Kind, make

ModelFactory = Callable[[], nn.Module]
Inputs = torch.Tensor | tuple[torch.Tensor, ...]


def _tuple(x: Inputs) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def _mode(model: nn.Module, training: bool) -> None:
    """train() / eval(), except on exported programs, which refuse both (their graph was
    captured in one mode)."""
    with contextlib.suppress(NotImplementedError):
        model.train(training)


def reinit_factory(module: nn.Module) -> ModelFactory:
    """A factory for an uploaded model's architecture with fresh weights: every submodule that
    has ``reset_parameters`` (Linear, Conv, norms, embeddings) redraws its parameters from the
    global generator, which :func:`init_params` seeds first. Parameters no module can reset
    keep their uploaded values as part of theta0 (:func:`reset_coverage` counts them)."""
    import copy

    template = copy.deepcopy(module)

    def make() -> nn.Module:
        model = copy.deepcopy(template)
        for sub in _resettable(model):
            sub.reset_parameters()  # type: ignore[operator]
        return model

    return make


def _resettable(module: nn.Module) -> list[nn.Module]:
    """The submodules a re-initialization calls ``reset_parameters`` on, in order."""
    return [sub for sub in module.modules()
            if sub is not module and callable(getattr(sub, "reset_parameters", None))]


def reset_coverage(module: nn.Module) -> tuple[int, int]:
    """(parameters that a re-initialization redraws, all parameters)."""
    covered = {id(p) for sub in _resettable(module) for p in sub.parameters()}
    params = list(module.parameters())
    return sum(p.numel() for p in params if id(p) in covered), sum(p.numel() for p in params)


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


def segments(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """For each flat coordinate, the index of the parameter tensor it belongs to."""
    sizes = torch.tensor([p.numel() for p in params.values()])
    return torch.repeat_interleave(torch.arange(len(sizes)), sizes)


@dataclass
class SubspaceRun:
    d: int
    accuracy: float
    d_vector: torch.Tensor
    seconds: float
    steps: int
    layer_scales: torch.Tensor | None = None
    buffers: dict[str, torch.Tensor] | None = None  # the buffers training changed (CPU)


@dataclass
class Artifact:
    """Everything needed to rebuild the trained model: a few numbers and d floats (plus the
    buffers training changed, if any)."""

    model: str
    theta0_seed: int
    projection: Kind
    projection_seed: int
    D: int
    d: int
    d_vector_b64: str  # float32 little-endian
    layer_scales_b64: str | None = None  # layer_scaling: one float32 per parameter tensor
    # buffers training changed (BatchNorm statistics): name -> pack_tensor record
    buffers: dict[str, dict[str, Any]] | None = None

    @property
    def values(self) -> torch.Tensor:
        return unpack_floats(self.d_vector_b64)

    @property
    def layer_scales(self) -> torch.Tensor | None:
        return None if self.layer_scales_b64 is None else unpack_floats(self.layer_scales_b64)

    def stored_bytes(self) -> int:
        scales = self.layer_scales
        m = 0 if scales is None else scales.numel()
        extra = sum(len(base64.b64decode(b["data"])) for b in (self.buffers or {}).values())
        return 4 * (self.d + m) + extra + 64  # the numbers plus the model name, seeds and sizes

    @staticmethod
    def pack(values: torch.Tensor) -> str:
        return base64.b64encode(values.detach().float().numpy().astype("<f4").tobytes()).decode()


def unpack_floats(b64: str) -> torch.Tensor:
    """The inverse of :meth:`Artifact.pack`."""
    return torch.from_numpy(np.frombuffer(base64.b64decode(b64), dtype="<f4").copy())


def pack_tensor(t: torch.Tensor) -> dict[str, Any]:
    """Any tensor as JSON: dtype, shape and its little-endian bytes in base64."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": base64.b64encode(raw).decode()}


def unpack_tensor(rec: dict[str, Any]) -> torch.Tensor:
    """The inverse of :func:`pack_tensor`."""
    raw = bytearray(base64.b64decode(rec["data"]))
    dtype = getattr(torch, rec["dtype"])
    flat = (torch.frombuffer(raw, dtype=dtype) if raw
            else torch.empty(0, dtype=dtype))
    return flat.reshape(rec["shape"]).clone()


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def changed_buffers(model: nn.Module, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The buffers of ``model`` that differ from ``before`` (on the CPU)."""
    return {n: b.detach().cpu().clone() for n, b in model.named_buffers()
            if n in before and not torch.equal(b, before[n])}


def _theta(flat0: torch.Tensor, offset: torch.Tensor, seg: torch.Tensor,
           scales: torch.Tensor | None) -> torch.Tensor:
    return flat0 + (offset if scales is None else offset * scales[seg])


def rebuild(art: Artifact, factory: ModelFactory) -> nn.Module:
    """The trained model from its artifact: theta0 from its seed, P from its seed."""
    model, theta0 = init_params(factory, art.theta0_seed)
    proj = make(art.projection, art.D, art.d, art.projection_seed)
    with torch.no_grad():
        theta = _theta(flatten(theta0), proj(art.values), segments(theta0), art.layer_scales)
        for name, value in unflatten(theta, theta0).items():
            model.get_parameter(name).copy_(value)
        for name, rec in (art.buffers or {}).items():
            model.get_buffer(name).copy_(unpack_tensor(rec))
    _mode(model, False)
    return model


def evaluate(model: nn.Module, params: dict[str, torch.Tensor] | None, x: Inputs,
             y: torch.Tensor, batch_size: int = 256) -> float:
    xs = _tuple(x)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            part = tuple(t[i:i + batch_size] for t in xs)
            out = functional_call(model, params, part) if params is not None else model(*part)
            correct += int((out.argmax(1) == y[i:i + batch_size]).sum())
    return correct / len(y)


def _on(device: torch.device, split: tuple[Inputs, torch.Tensor]
        ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    return tuple(t.to(device) for t in _tuple(split[0])), split[1].to(device)


def _placed(factory: ModelFactory, seed: int, device: torch.device
            ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """:func:`init_params` drawn on the CPU (one theta0 per seed on every device), then moved."""
    model, theta0 = init_params(factory, seed)
    return model.to(device), {n: p.to(device) for n, p in theta0.items()}


def train_subspace(factory: ModelFactory, d: int, kind: Kind, train: tuple[Inputs, torch.Tensor],
                   test: tuple[Inputs, torch.Tensor], epochs: int, lr: float,
                   theta0_seed: int, projection_seed: int, batch_size: int = 64,
                   check: Callable[[], None] | None = None, layer_scaling: bool = False,
                   device: torch.device | None = None) -> SubspaceRun:
    """Adam on the d coordinates only (and the per-tensor scales with ``layer_scaling``);
    returns the test accuracy of theta0 + P d. Runs on ``device`` (default: the CPU); the
    batch order, theta0 and P are drawn on the CPU, so they do not depend on it."""
    t0 = time.perf_counter()
    device = device or torch.device("cpu")
    model, theta0 = _placed(factory, theta0_seed, device)
    flat0, seg = flatten(theta0), segments(theta0).to(device)
    proj = make(kind, flat0.numel(), d, projection_seed).to(device)
    z = torch.zeros(d, device=device, requires_grad=True)
    scales = (torch.ones(len(theta0), device=device, requires_grad=True) if layer_scaling
              else None)
    opt = torch.optim.Adam([z] if scales is None else [z, scales], lr=lr)
    xs, y = _on(device, train)
    gen = torch.Generator().manual_seed(theta0_seed)
    buffers0 = _buffers(model)
    steps = 0
    _mode(model, True)
    for _ in range(epochs):
        if check is not None:
            check()
        perm = torch.randperm(len(y), generator=gen).to(device)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            params = unflatten(_theta(flat0, proj(z), seg, scales), theta0)
            out = functional_call(model, params, tuple(t[idx] for t in xs))
            loss = nn.functional.cross_entropy(out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    _mode(model, False)
    with torch.no_grad():
        acc = evaluate(model, unflatten(_theta(flat0, proj(z), seg, scales), theta0),
                       *_on(device, test))
    return SubspaceRun(d, acc, z.detach().cpu().clone(), time.perf_counter() - t0, steps,
                       None if scales is None else scales.detach().cpu().clone(),
                       changed_buffers(model, buffers0) or None)


def train_full(factory: ModelFactory, train: tuple[Inputs, torch.Tensor],
               test: tuple[Inputs, torch.Tensor], epochs: int, lr: float, seed: int,
               batch_size: int = 64, device: torch.device | None = None) -> float:
    """The baseline: all D parameters trained, same data, epochs and optimizer."""
    device = device or torch.device("cpu")
    model, _ = _placed(factory, seed, device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xs, y = _on(device, train)
    gen = torch.Generator().manual_seed(seed)
    _mode(model, True)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen).to(device)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(*(t[idx] for t in xs)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    _mode(model, False)
    return evaluate(model, None, *_on(device, test))
