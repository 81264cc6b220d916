"""LoRA accuracy recovery for a quantized configuration.

Each quantized layer's weight becomes W + B A / r (A random, B = 0, so training starts from the
plain quantized model) and the sum is quantized as a whole: the forward pass sees exactly the
deployed arithmetic (the format's weight grid, dynamically quantized inputs), gradients pass the
rounding straight through. The adapters learn to make the quantized model's outputs match the
float model's on training data disjoint from the evaluation data. Merged into the weight before
quantization, they cost nothing at inference: the deployed graph is the plain one with other
weights.

Reported per layer, the norms the LoRA-limits paper (Hu et al., 2024) bounds fast adapter
gradients with: largest entries of the layer's inputs, its frozen weight and both adapters.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from app.schemas import LoraNorm, LoraRecovery
from workers.engine.context import memo_key
from workers.engine.quant.fake import quantize_input, quantize_weight, simulate
from workers.engine.quant.formats import LayerFormat
from workers.engine.quant.task import QuantTask, config_key


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward: q; backward: identity to x (the straight-through estimator)."""
    return x + (q - x).detach()


def _weight(layer: nn.Module) -> torch.Tensor:
    w = layer.weight
    assert isinstance(w, torch.Tensor)
    return w


@dataclass
class Adapters:
    rank: int
    a: dict[str, torch.Tensor]  # layer -> (r, fan_in)
    b: dict[str, torch.Tensor]  # layer -> (out, r)

    def delta(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The update B A / r in the shape of the layer's weight."""
        return (self.b[name] @ self.a[name]).reshape(like.shape) / self.rank


@dataclass
class Training:
    adapters: Adapters
    loss_before: float
    loss_after: float
    seconds: float


def _batches(n: int, batch: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, n, (min(batch, n),), generator=gen)


def _output_loss(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (out.float() - ref).pow(2).flatten(1).sum(1).mean()


def train(task: QuantTask, config: Mapping[str, LayerFormat], opts: LoraRecovery,
          inputs: tuple[torch.Tensor, ...], reference: torch.Tensor) -> Training:
    """Adapters for every quantized layer of ``config``, trained on ``inputs`` to reproduce the
    float model's ``reference`` outputs through the quantized arithmetic."""
    names = [n for n, f in config.items() if f.precision != "fp32"]
    for f in config.values():
        if f.is_static:
            raise ValueError("LoRA recovery needs dynamic levels: static grids are calibrated "
                             "on the float weights")
    gen = torch.Generator().manual_seed(opts.seed)
    frozen = {n: _weight(task.layers[n]).detach() for n in names}
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for n in names:
        w = frozen[n]
        fan_in = w[0].numel()
        a[n] = (torch.randn(opts.rank, fan_in, generator=gen) / math.sqrt(fan_in)).requires_grad_()
        b[n] = torch.zeros(w.shape[0], opts.rank, requires_grad=True)
    adapters = Adapters(opts.rank, a, b)

    def weights() -> dict[str, torch.Tensor]:
        out = {}
        for n in names:
            w = frozen[n] + adapters.delta(n, frozen[n])
            out[f"{n}.weight"] = _ste(w, quantize_weight(w.detach(), config[n]))
        return out

    def input_hook(fmt: LayerFormat):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return (_ste(args[0], quantize_input(args[0].detach(), fmt)), *args[1:])

        return hook

    hooks = [task.layers[n].register_forward_pre_hook(input_hook(config[n])) for n in names
             if config[n].quantizes_activations]
    module = task.module
    grads = {p: p.requires_grad for p in module.parameters()}
    for p in module.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([*a.values(), *b.values()], lr=opts.learning_rate)
    t0 = time.perf_counter()
    try:
        for idx in _batches(len(inputs[0]), opts.batch_size, opts.steps, opts.seed):
            out = torch.func.functional_call(module, weights(), tuple(t[idx] for t in inputs))
            loss = _output_loss(out, reference[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if task.ctx is not None:
                task.ctx.check_cancelled()
    finally:
        for h in hooks:
            h.remove()
        for p, g in grads.items():
            p.requires_grad_(g)
    for t in (*a.values(), *b.values()):
        t.requires_grad_(False)
    seconds = time.perf_counter() - t0
    with merged(task.layers, adapters), simulate(task.layers, config), torch.no_grad():
        after = float(_output_loss(task.forward(inputs), reference))
    with simulate(task.layers, config), torch.no_grad():
        before = float(_output_loss(task.forward(inputs), reference))
    return Training(adapters, before, after, seconds)


@contextmanager
def merged(layers: Mapping[str, nn.Module], adapters: Adapters) -> Iterator[None]:
    """Within the block, each adapted layer's weight is W + B A / r."""
    saved = {}
    with torch.no_grad():
        for n in adapters.a:
            w = _weight(layers[n])
            saved[n] = w.detach().clone()
            w.add_(adapters.delta(n, w))
    try:
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                _weight(layers[n]).copy_(w)


def merged_copy(module: nn.Module, layers: Mapping[str, nn.Module], adapters: Adapters
                ) -> nn.Module:
    """A copy of ``module`` with the adapters merged into its weights (what gets deployed)."""
    with merged(layers, adapters):
        return copy.deepcopy(module)


def norms(task: QuantTask, config: Mapping[str, LayerFormat], adapters: Adapters,
          inputs: tuple[torch.Tensor, ...]) -> list[LoraNorm]:
    """The LoRA-limits norms per adapted layer, the inputs' maximum measured on ``inputs`` in
    the recovered, quantized model."""
    input_max: dict[str, float] = {}

    def record(name: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            input_max[name] = max(input_max.get(name, 0.0), float(args[0].detach().abs().max()))
        return hook

    hooks = [task.layers[n].register_forward_pre_hook(record(n)) for n in adapters.a]
    try:
        with merged(task.layers, adapters), simulate(task.layers, config):
            task.forward(inputs)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for n in adapters.a:
        w = _weight(task.layers[n])
        out.append(LoraNorm(layer=n, input_max=input_max.get(n, 0.0),
                            weight_max=float(w.detach().abs().max()),
                            a_max=float(adapters.a[n].abs().max()),
                            b_max=float(adapters.b[n].abs().max()),
                            update_fro=float(adapters.delta(n, w).norm())))
    return out


class Recovery:
    """The recovered metric of any config: adapters trained for it, merged, evaluated in
    simulation. Metrics are memoized in the job (a retried job does not retrain for them);
    the adapters of the last configs asked for are kept for deployment."""

    def __init__(self, task: QuantTask, opts: LoraRecovery, inputs: tuple[torch.Tensor, ...]
                 ) -> None:
        self.task, self.opts, self.inputs = task, opts, inputs
        self.reference = task.forward(inputs)
        self.trained: dict[str, Training] = {}
        self.trainings = 0
        self.seconds = 0.0
        self._opts_key = memo_key("lora", opts.model_dump())

    def training(self, config: Mapping[str, LayerFormat]) -> Training:
        key = config_key(config)
        if key not in self.trained:
            self.trained[key] = train(self.task, config, self.opts, self.inputs, self.reference)
            self.trainings += 1
            self.seconds += self.trained[key].seconds
        return self.trained[key]

    def evaluate(self, config: Mapping[str, LayerFormat]) -> float:
        if not any(f.precision != "fp32" for f in config.values()):
            return self.task.evaluate(config)
        task = self.task
        return task.memoized(f"lora-metric:{self._opts_key}", config,
                             lambda: task.score(task.forward(task.eval_inputs)),
                             around=lambda: merged(task.layers, self.training(config).adapters))
