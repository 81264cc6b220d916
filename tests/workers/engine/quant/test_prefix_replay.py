"""Leave-one-out terms with the shared prefix replayed equal those computed in full, and the
replay skips what it may and nothing else."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workers.engine.quant import prefix
from workers.engine.quant.formats import parse
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
    full = dependency_terms(task, layers, fmt_of, prefix_replay=False)
    replayed = dependency_terms(task, layers, fmt_of)
    assert replayed.keys() == full.keys()
    for name in layers:
        assert replayed[name] == pytest.approx(full[name], rel=1e-6, abs=1e-9), name
    assert any(abs(v) > 1e-6 for v in full.values()), full  # the terms are not all zero


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
