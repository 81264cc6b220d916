"""Leave-one-out terms with the shared prefix replayed equal those computed in full, and the
replay skips what it may and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from workers.engine.context import LocalContext
from workers.engine.quant import prefix
from workers.engine.quant.formats import FP32, parse
from workers.engine.quant.sensitivity import dependency_terms
from workers.engine.quant.task import QuantTask, quantizable_layers


class Block(nn.Module):
    """Residual block returning a tuple, with an in-place ReLU on the recorded output's path."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.act(self.fc1(x))
        return x + self.fc2(h), h.mean(-1)


class Net(nn.Module):
    def __init__(self, d: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(3))
        self.shared = nn.LayerNorm(d)  # called twice: never replayed
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.shared(self.embed(x))
        for block in self.blocks:
            h, _ = block(h)
            h.mul_(0.9)  # in place on a replayed block's output: the record must not change
        out: torch.Tensor = self.head(self.shared(h))
        return out


def _task(metric: str) -> QuantTask:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(96, 8)
    y = torch.randint(0, 5, (96,))
    return QuantTask(model, quantizable_layers(model), (x[:32],), y[:32], (x[32:],), y[32:],
                     metric, batch_size=16)


@pytest.mark.parametrize("metric", ["accuracy", "cosine"])
def test_replayed_terms_equal_full_computation(metric: str) -> None:
    task = _task(metric)
    layers = list(task.layers)
    fmt_of = {n: parse("int8") for n in layers}
    # Replayed first, on a fresh task: nothing computed before may stand in for what the replay
    # must not touch (the float references).
    replayed = dependency_terms(task, layers, fmt_of)
    full = dependency_terms(_task(metric), layers, fmt_of, prefix_replay=False)
    assert replayed.keys() == full.keys()
    for name in layers:
        assert replayed[name] == pytest.approx(full[name], rel=1e-6, abs=1e-9), name
    assert any(abs(v) > 1e-6 for v in full.values()), full  # the terms are not all zero


def test_replay_when_another_worker_computed_the_full_loss(tmp_path: Path) -> None:
    """The fully quantized loss and the terms of the layers before the first replayed block
    memoized by another worker (a piece of the job): the float references are then first
    needed inside a replay, which must not compute them."""
    ctx = LocalContext(tmp_path)
    layers = list(_task("cosine").layers)
    fmt_of = {n: parse("int8") for n in layers}
    other = _task("cosine")
    other.ctx = ctx
    other.calib_loss(fmt_of)
    for name in layers[:3]:  # embed, blocks.0.*: nothing runs before them to replay
        other.calib_loss({**fmt_of, name: FP32})
    task = _task("cosine")
    task.ctx = ctx
    replayed = dependency_terms(task, layers, fmt_of)
    full = dependency_terms(_task("cosine"), layers, fmt_of, prefix_replay=False)
    for name in layers:
        assert replayed[name] == pytest.approx(full[name], rel=1e-6, abs=1e-9), name


def test_plan_skips_finished_modules_only() -> None:
    task = _task("accuracy")
    plan = prefix.PrefixReplay.plan(task, list(task.layers))
    assert plan is not None
    # Restoring the last block's fc2 replays the first two blocks. Not replayed: the
    # quantized layers (the simulation sets their formats: embed, blocks.2.fc1), the
    # in-place ReLU (its output is its input) and the LayerNorm called twice.
    assert plan.skip["blocks.2.fc2"] == ["blocks.0", "blocks.1"]
    replayed = {m for ms in plan.skip.values() for m in ms}
    assert not replayed & ({"shared", "embed"} | {f"blocks.{i}.act" for i in range(3)})
    assert "embed" not in plan.skip  # nothing finishes before the first layer
    assert plan.skip["head"] == ["blocks.0", "blocks.1", "blocks.2"]


def test_budget_keeps_a_subset_and_the_same_terms(monkeypatch: pytest.MonkeyPatch) -> None:
    task = _task("accuracy")
    layers = list(task.layers)
    fmt_of = {n: parse("int8") for n in layers}
    whole = prefix.PrefixReplay.plan(task, layers)
    assert whole is not None
    monkeypatch.setattr(prefix, "BUDGET_BYTES", whole.nbytes // 2)
    half = prefix.PrefixReplay.plan(task, layers)
    assert half is not None and 0 < half.nbytes <= whole.nbytes // 2
    assert set(half.records) < set(whole.records)
    full = dependency_terms(task, layers, fmt_of, prefix_replay=False)
    replayed = dependency_terms(task, layers, fmt_of)
    assert all(replayed[n] == pytest.approx(full[n], rel=1e-6, abs=1e-9) for n in layers)
    monkeypatch.setattr(prefix, "BUDGET_BYTES", 1024)  # not even one record fits
    assert prefix.PrefixReplay.plan(task, layers) is None
    assert dependency_terms(task, layers, fmt_of) == pytest.approx(full, rel=1e-6, abs=1e-9)


class Bump(nn.Module):
    """Changes its (keyword) input in place and returns a fresh tensor."""

    def forward(self, *, x: torch.Tensor) -> torch.Tensor:
        x.add_(1.0)
        return x * 0.5


class TiedProbe(nn.Module):
    """Reads the embedding layer's weight without being that layer (tied weights)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class Tricky(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.pre = nn.Tanh()
        self.tied_probe = TiedProbe(nn.Parameter(torch.zeros(d, 8)))
        self.embed = nn.Linear(8, d)
        self.tied_probe.weight = self.embed.weight  # same Parameter
        self.bump = Bump()
        self.branch = nn.Sigmoid()  # called once, twice or not at all, by the data
        self.block = Block(d)
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tied_probe(self.pre(x))
        h = self.embed(x) + t
        h = self.bump(x=h) + h  # uses the bumped input
        for _ in range(int(x[0, 0] > 0) + int(x[0, 1] > 0)):
            h = h + self.branch(h)
        h, _ = self.block(h)
        out: torch.Tensor = self.head(h)
        return out


def test_unsafe_modules_are_not_replayed() -> None:
    torch.manual_seed(1)
    model = Tricky().eval()
    x = torch.randn(92, 8)
    x[32, :2] = torch.tensor([1.0, -1.0])  # first calibration batch: branch called once
    x[48, :2] = torch.tensor([1.0, 1.0])  # second: twice
    task = QuantTask(model, quantizable_layers(model), (x[:32],), torch.randint(0, 5, (32,)),
                     (x[32:],), torch.randint(0, 5, (60,)), "accuracy", batch_size=16)
    layers = list(task.layers)  # 60 samples: the last batch has 12
    fmt_of = {n: parse("int8") for n in layers}
    plan = prefix.PrefixReplay.plan(task, layers)
    assert plan is not None
    assert "tied_probe" not in plan.skip["embed"] and "pre" in plan.skip["embed"]
    planned = {m for ms in plan.skip.values() for m in ms}
    assert "bump" not in planned  # in place on its keyword input
    assert "branch" in planned  # once in the traced batch...
    plan.record(task, {n: fmt_of[n] for n in layers})
    assert "branch" not in {m for ms in plan.skip.values() for m in ms}  # ...not in every batch
    assert "block" in plan.skip["head"] and len(plan.records["block"]) == 4
    full = dependency_terms(task, layers, fmt_of, prefix_replay=False)
    replayed = dependency_terms(task, layers, fmt_of)
    assert all(replayed[n] == pytest.approx(full[n], rel=1e-6, abs=1e-9) for n in layers)
