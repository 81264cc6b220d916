"""What is deployed, simulated and counted matches what the config and the report say: a float
Conv between static layers stays float, tied weights are simulated as deployed, timing runs the
stated repeats, and a search counts every evaluation it makes."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from workers.engine.backends import onnxruntime_cpu as ortb
from workers.engine.backends.base import interleaved_latency
from workers.engine.backends.torch_runtime import TorchBackend
from workers.engine.quant import search as qsearch
from workers.engine.quant.fake import simulate
from workers.engine.quant.formats import LayerFormat, parse
from workers.engine.quant.task import Config, quantizable_layers, threshold


class _ConvChain(nn.Module):
    """Conv -> depthwise Conv (no bias) -> Linear: the middle one stays fp32 in the config."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, groups=8, bias=False)
        self.fc = nn.Linear(8 * 6 * 6, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.dw(torch.relu(self.c(x))))
        out: torch.Tensor = self.fc(y.flatten(1))
        return out


def test_a_float_conv_between_static_layers_is_deployed_float() -> None:
    """ORT's WeightBiasQuantization optimizer quantized the weight of a float Conv that sits
    between a static layer's DequantizeLinear and the next one's QuantizeLinear: the deployed
    model ran int8 where the config (and the simulation) said fp32."""
    torch.manual_seed(0)
    model = _ConvChain().eval()
    x = torch.randn(64, 4, 8, 8)
    layers = quantizable_layers(model)
    exported = ortb.export(model, (x[:8],), ["x"], layers)
    exported.set_calibration((x,))
    static = LayerFormat("int8", activations="static")
    cfg = {n: ortb.native_format(exported, n, static) for n in ("c", "fc")}
    assert all(f.realizable for f in cfg.values())
    deployed = ortb.Session(ortb.realize(exported, cfg), 1).run((x,))
    with simulate(layers, cfg), torch.inference_mode():
        simulated = model(x).numpy()
    with torch.inference_mode():
        flt = model(x).numpy()
    assert np.abs(deployed - flt).max() > 1e-3  # the quantization is really there
    assert np.abs(deployed - simulated).max() <= 1e-5


class _TiedLM(nn.Module):
    """A language model whose head shares its weight with the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.relu(self.fc(self.emb(x))))
        return out


def test_a_tied_head_is_simulated_as_deployed() -> None:
    """The simulation wrote the quantized head weight into the parameter it shares with the
    embedding, so the simulated model looked up quantized embeddings the deployed one (torch
    replaces the head, ONNX folds its own transposed copy) never uses."""
    torch.manual_seed(0)
    model = _TiedLM().eval()
    x = torch.randint(0, 64, (16, 8))
    layers = quantizable_layers(model)
    backend = TorchBackend("torch-cpu", model, layers)
    cfg = {"head": backend.native_format("head", parse("int8"))}
    deployed = backend.realize(cfg).run((x,))
    with simulate(layers, cfg), torch.inference_mode():
        simulated = model(x).numpy()
    with torch.inference_mode():
        flt = model(x).numpy()
    assert np.abs(deployed - flt).max() > 1e-2
    assert np.abs(deployed - simulated).max() <= 1e-4
    assert model.head.weight is model.emb.weight  # the float model is as it was


def test_two_tied_layers_in_one_config_leave_the_float_model_float() -> None:
    torch.manual_seed(0)
    first, second = nn.Linear(16, 16), nn.Linear(16, 16)
    second.weight = first.weight
    net = nn.Sequential(first, nn.ReLU(), second)
    w0 = first.weight.detach().clone()
    layers = quantizable_layers(net)
    with simulate(layers, {"0": parse("int8"), "2": parse("int4")}):
        pass
    assert torch.equal(first.weight, w0) and second.weight is first.weight


def test_interleaved_timing_runs_the_repeats_the_report_states() -> None:
    """The report says "{repeats} runs, median"; the rounds rounded the count up to a multiple
    of 5 (1 repeat timed 5 runs, 7 timed 10)."""
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    x = torch.randn(4, 8)
    exported = ortb.export(model, (x,), ["x"], quantizable_layers(model))
    sessions = {"fp32": ortb.Session(exported.model, 1), "int8": ortb.Session(ortb.realize(
        exported, {"0": ortb.native_format(exported, "0", parse("int8"))}), 1)}
    for repeats in (1, 3, 7, 30):
        samples = interleaved_latency(sessions, (x,), 0, repeats)
        assert {k: len(v) for k, v in samples.items()} == {"fp32": repeats, "int8": repeats}


def test_a_search_from_a_floor_counts_every_evaluation_it_makes() -> None:
    """The recovered search starts at the plain one's boundary; where it ends there, the
    metric of that config was evaluated (an adapter training) but not counted."""
    names = [f"l{i}" for i in range(8)]
    int8 = {n: LayerFormat("int8") for n in names}
    calls: list[Config] = []

    def evaluate(cfg: object) -> float:  # one point of metric per quantized layer
        assert isinstance(cfg, dict)
        calls.append(dict(cfg))
        return 100.0 - len(cfg)

    levels = [("int8", qsearch.Level(int8, names))]
    out = qsearch.bisection_search(evaluate, threshold(100.0, "absolute", 3.0, True), levels,
                                   "augmented+lora", floor=3)
    assert out.boundaries == {"int8": 3} and out.metric == 97.0
    assert out.evaluations == len(calls)
