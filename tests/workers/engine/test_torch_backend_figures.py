"""Figures of the torch backends and the benchmark job: what the sizes count, what a 16-bit
layer does to a weight it shares, and what runs beside the timed runs."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from torch import nn

from app.config import Settings
from app.schemas import BenchmarkSpec, ModelRef
from app.storage import open_store
from workers.engine import benchmark
from workers.engine.backends import torch_runtime
from workers.engine.context import LocalContext
from workers.engine.datasets import TensorData
from workers.engine.models import LoadedModel
from workers.engine.quant.formats import parse
from workers.engine.quant.task import quantizable_layers


def _tied_mlp() -> nn.Sequential:
    """Four Linear layers; 0, 2 and 3 share one weight (as a head shares its embedding's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 16))
    model[2].weight = model[0].weight
    model[3].weight = model[0].weight
    return model.eval()


def _untied(model: nn.Sequential) -> nn.Sequential:
    out = copy.deepcopy(model)
    for i in (2, 3):
        out[i].weight = nn.Parameter(model.get_parameter("0.weight").detach().clone())
    return out


def _realize(model: nn.Module, labels: dict[str, str]) -> torch_runtime.TorchModel:
    backend = torch_runtime.TorchBackend("torch-cpu", model, quantizable_layers(model))
    return backend.realize({n: backend.native_format(n, parse(p)) for n, p in labels.items()})


def test_a_16bit_layer_leaves_the_layers_it_shares_a_weight_with_as_configured() -> None:
    """Casting a layer to bf16 must not cast the Parameter it shares: the fp32 layer tied to it
    would get bf16 weights (and fail on its fp32 input), an int8 layer tied to it would quantize
    bf16-rounded weights."""
    model = _tied_mlp()
    x = torch.randn(8, 16)
    for labels in ({"2": "bf16"}, {"2": "bf16", "3": "int8"}, {"3": "bf16", "2": "int8"},
                   {"2": "bf16", "3": "fp16"}):
        deployed = _realize(model, labels)
        assert deployed.module.get_parameter("0.weight").dtype == torch.float32, labels
        expected = _realize(_untied(model), labels).run((x,))
        assert np.array_equal(deployed.run((x,)), expected), labels
        rebuilt = torch_runtime.load(model, deployed.artifact()[1])
        with torch.inference_mode():
            assert np.array_equal(rebuilt(x).numpy(), expected), labels
    assert model[0].weight.dtype == torch.float32 and model[2].weight is model[0].weight


def test_tied_weights_are_counted_and_shipped_once() -> None:
    model = _tied_mlp()
    unique = sum(p.numel() * p.element_size() for p in model.parameters())
    fp32 = _realize(model, {})
    assert fp32.size_bytes == unique
    # Two tied layers at bf16 stay tied: one bf16 copy beside the fp32 layer's weight.
    both = _realize(model, {"2": "bf16", "3": "bf16"})
    assert both.module.get_parameter("2.layer.weight") is both.module.get_parameter(
        "3.layer.weight")
    assert both.size_bytes == unique + 16 * 16 * 2
    x = torch.randn(8, 16)
    for deployed in (fp32, both):
        blob = deployed.artifact()[1]
        stored = load_tensors(blob)
        assert sum(t.numel() * t.element_size() for t in stored.values()) == deployed.size_bytes
        rebuilt = torch_runtime.load(model, blob)
        with torch.inference_mode():
            assert np.array_equal(rebuilt(x).numpy(), deployed.run((x,)))
    assert set(load_tensors(fp32.artifact()[1])) == {"0.weight", "0.bias", "2.bias", "3.bias"}
    # The benchmark job's model_bytes counts them once too.
    loaded = LoadedModel("tied", model, ["x"], "embedding", TensorData({"x": x}))
    assert loaded.state_bytes() == unique


class _ThreadsWhileTimed(LocalContext):
    """Records the Python threads alive at each progress report of the timed runs."""

    def __init__(self, workdir: Path, store_root: Path) -> None:
        super().__init__(workdir, store=open_store(Settings(store_url=store_root.as_uri())))
        self.before: set[threading.Thread] = set(threading.enumerate())
        self.while_timed: set[threading.Thread] = set()

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        if stage == "measure":
            self.while_timed |= set(threading.enumerate())
        super().progress(stage, fraction, message)


def test_the_memory_sampler_does_not_run_during_the_timed_runs(tmp_path: Path,
                                                               shared_store: Path) -> None:
    """The CPU peak-memory sampler wakes every millisecond; running during the timed runs it
    added about 10% to a small model's median on a 2-core VM."""
    ctx = _ThreadsWhileTimed(tmp_path, shared_store)
    res = benchmark.run(BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), batch_size=8, repeats=5,
                                      warmup=2, per_layer=False, device="cpu"), ctx)
    assert ctx.while_timed and not ctx.while_timed - ctx.before, ctx.while_timed - ctx.before
    assert res.latency.warmup == 2 and res.latency.repeats == 5
    assert res.peak_memory_bytes >= 0 and "warm-up" in res.memory_method
