"""ANN -> SNN conversion of ReLU classifiers, then surrogate-gradient fine-tuning.

Every ReLU becomes an LIF layer run for ``time_steps`` steps (rate coding: a neuron's spike rate
stands for its activation). The layers before the first ReLU read the real-valued input, which
is the same at every step, so they run once (their multiply-accumulates are counted once). Each
LIF's threshold starts at a high percentile of the ReLU's activations on training data, and the
next weight layer is scaled by it, so spike rates times weights approximate the original
network before fine-tuning starts.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import nn

from workers.engine.context import UserError
from workers.engine.spiking.neurons import LIF, over_time
from workers.engine.zoo import DigitsCNN

_STAGES = (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten)


def stages_of(model: nn.Module) -> list[nn.Module]:
    """A supported model as its list of layers, in order (copies; the model is untouched)."""
    if isinstance(model, DigitsCNN):
        seq: list[nn.Module] = [model.conv1, nn.ReLU(), model.conv2, nn.ReLU(), model.pool,
                                nn.Flatten(), model.fc1, nn.ReLU(), model.fc2, nn.ReLU(), model.fc3]
    elif isinstance(model, nn.Sequential):
        # every position, not every distinct module: a ReLU instance used at two places is two
        # stages (``modules()`` would list it once and drop the second nonlinearity)
        seq = [m for _, m in model.named_modules(remove_duplicate=False)
               if not isinstance(m, nn.Sequential)]
    else:
        raise UserError(f"spiking conversion supports digits-cnn and nn.Sequential stacks of "
                        f"Linear / Conv2d / ReLU / pooling / Flatten, not {type(model).__name__}")
    bad = sorted({type(m).__name__ for m in seq if not isinstance(m, _STAGES)})
    if bad:
        raise UserError(f"cannot convert layers of type {', '.join(bad)} to spiking ones")
    if not any(isinstance(m, nn.ReLU) for m in seq):
        raise UserError("the model has no ReLU to turn into spiking neurons")
    return [copy.deepcopy(m) for m in seq]


class SpikingClassifier(nn.Module):
    def __init__(self, stages: list[nn.Module], time_steps: int, beta: float) -> None:
        super().__init__()
        first = next(i for i, m in enumerate(stages) if isinstance(m, nn.ReLU))
        self.time_steps = time_steps
        self.encoder = nn.Sequential(*stages[:first])
        self.body = nn.ModuleList(LIF(beta=beta) if isinstance(m, nn.ReLU) else m
                                  for m in stages[first:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.encoder(x)  # constant over time: computed once
        h = a.unsqueeze(0).expand(self.time_steps, *a.shape)
        for m in self.body:
            h = m(h) if isinstance(m, LIF) else over_time(m, h)
        out: torch.Tensor = h.mean(0)  # the output layer's average over the time steps
        return out


@torch.no_grad()
def calibrate(snn: SpikingClassifier, ann_stages: list[nn.Module], x: torch.Tensor,
              percentile: float) -> list[float]:
    """Thresholds from the ANN's activations; the following weight layer absorbs each one."""
    acts: list[torch.Tensor] = []
    h = x
    for m in ann_stages:
        h = m(h)
        if isinstance(m, nn.ReLU):
            acts.append(h.flatten())
    lifs = [m for m in snn.body if isinstance(m, LIF)]
    thresholds = []
    for lif, a in zip(lifs, acts, strict=True):
        pos = a[a > 0]
        th = float(torch.quantile(pos[:1_000_000], percentile / 100)) if len(pos) else 1.0
        lif.threshold.fill_(th)  # type: ignore[operator]
        thresholds.append(th)
    # scale the first weight layer after each LIF by that LIF's threshold
    pending: float | None = None
    for m in snn.body:
        if isinstance(m, LIF):
            pending = float(m.threshold)  # type: ignore[arg-type]
        elif isinstance(m, (nn.Linear, nn.Conv2d)) and pending is not None:
            m.weight.mul_(pending)
            pending = None
    return thresholds


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                   for i in range(0, len(x), batch))
    return hits / len(x)


def convert(ann: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, time_steps: int,
            beta: float, epochs: int, lr: float = 5e-4, percentile: float = 99.0, seed: int = 0,
            check: Callable[[int], None] | None = None) -> tuple[SpikingClassifier, dict[str, float]]:
    """The converted network, fine-tuned ``epochs`` times over the training data; and
    ``{"converted_train_accuracy", "fine_tune_seconds"}``."""
    stages = stages_of(ann)
    snn = SpikingClassifier(copy.deepcopy(stages), time_steps, beta).to(x_train.device)
    calibrate(snn, stages, x_train[:512], percentile)
    before = accuracy(snn, x_train, y_train)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(snn.parameters(), lr=lr)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        if check is not None:
            check(epoch)
        snn.train()
        perm = torch.randperm(len(x_train), generator=gen).to(x_train.device)
        for i in range(0, len(x_train), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(snn(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    snn.eval()
    return snn, {"converted_train_accuracy": before, "fine_tune_seconds": time.perf_counter() - t0}
