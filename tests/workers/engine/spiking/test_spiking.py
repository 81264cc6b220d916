"""Spiking building blocks: binary spikes, the operation counter against hand counts (and
against an accumulate-only evaluation), the WKV recurrence, conversion and the job."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from app.config import Settings
from app.schemas import SpikingResult, SpikingSpec
from app.storage import Store, open_store
from gpu_kernels.lif import lif_reference
from workers.engine import char_lm, datasets, env, zoo
from workers.engine.context import LocalContext, UserError
from workers.engine.spiking import convert as conv
from workers.engine.spiking import job
from workers.engine.spiking.neurons import LIF
from workers.engine.spiking.ops import PJ_PER_AC, PJ_PER_MAC, OpCounter, count_layer
from workers.engine.spiking.rwkv import RWKVLM, MixLinear, wkv


def zoo_store(path: Path) -> Store:
    return open_store(Settings(store_url=path.as_uri()))


def test_lif_layer_is_the_kernel_with_its_threshold() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.round(torch.randn(16, 4, 33, generator=gen) * 8) / 8  # dyadic: exact arithmetic
    layer = LIF(beta=0.5, threshold=2.0)
    out = layer(x)
    assert torch.equal(out, lif_reference(x, 0.5, 2.0))
    assert set(out.unique().tolist()) == {0.0, 1.0}


def test_op_counter_matches_hand_counts() -> None:
    lin = nn.Linear(3, 2)
    spikes = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert count_layer(lin, spikes) == (2 * 3 * 2, 3 * 2, 3)  # dense MACs, ACs, active inputs
    conv3 = nn.Conv2d(1, 2, 3, padding=1)
    corner = torch.zeros(1, 1, 3, 3)
    corner[0, 0, 0, 0] = 1  # read by outputs (0,0) (0,1) (1,0) (1,1), each for 2 channels
    # in-bounds taps of the 3x3 outputs: 4 corners read 4 inputs, 4 edges 6, the centre 9
    assert count_layer(conv3, corner) == ((4 * 4 + 4 * 6 + 9) * 2, 4 * 2, 1)
    center = torch.zeros(1, 1, 3, 3)
    center[0, 0, 1, 1] = 1  # read by all 9 outputs
    assert count_layer(conv3, center)[1] == 9 * 2
    strided = nn.Conv2d(1, 3, 3, stride=2, padding=1)
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 1  # outputs (0..1, 0..1) all cover row 1 / col 1
    # windows centred on rows / cols 0 and 2: 2 and 3 in-bounds rows, 2 and 3 columns
    assert count_layer(strided, x) == ((2 + 3) * (2 + 3) * 3, 4 * 3, 1)
    mix = MixLinear(2, 5, torch.tensor([0.3, 0.6]))
    s = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]])  # 3 spikes now, 1 one step later
    assert count_layer(mix, s) == (3 * 2 * 5, (3 + 1) * 5, 3)

    # through the hooks: a binary input counts accumulates, a real-valued one the dense MACs
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 4))
    with OpCounter(net) as ops:
        net(spikes)
    first, second = ops.counts.layers["0"], ops.counts.layers["1"]
    assert (first.acs, first.macs, first.input_rate) == (6, 0, 0.5)
    assert (second.acs, second.macs, second.input_rate) == (0, 2 * 2 * 4, None)
    assert ops.counts.energy_pj() == pytest.approx(PJ_PER_AC * 6 + PJ_PER_MAC * 16)


def _taps_by_hand(layer: nn.Conv2d, x: torch.Tensor) -> tuple[int, int]:
    """(taps that read an input element, of them those reading a nonzero one) x output channels
    per group, by visiting every output position and kernel tap; a pad other than zeros reads
    the input element it copies (reflect / replicate / circular index maps)."""
    n, c, h, w = x.shape
    out_h, out_w = layer(x).shape[-2:]  # the layer's real output size
    g, k, st, dil = layer.groups, layer.kernel_size, layer.stride, layer.dilation
    # leading pad per axis: "same" puts the odd extra element at the end
    pad = ([dil[a] * (k[a] - 1) // 2 for a in (0, 1)] if layer.padding == "same"
           else [int(p) for p in layer.padding])
    mode = layer.padding_mode

    def index(i: int, size: int) -> int | None:
        if 0 <= i < size:
            return i
        if mode == "zeros":
            return None
        if mode == "reflect":
            return -i if i < 0 else 2 * (size - 1) - i
        if mode == "replicate":
            return min(max(i, 0), size - 1)
        return i % size  # circular

    vals = x.tolist()
    taps = active = 0
    for b in range(n):
        for ch in range(c):
            for oi in range(out_h):
                for oj in range(out_w):
                    for a in range(k[0]):
                        for bb in range(k[1]):
                            r = index(oi * st[0] - pad[0] + a * dil[0], h)
                            s = index(oj * st[1] - pad[1] + bb * dil[1], w)
                            if r is not None and s is not None:
                                taps += 1
                                active += vals[b][ch][r][s] != 0
    per_group = layer.out_channels // g
    return taps * per_group, active * per_group


@pytest.mark.parametrize("layer", [
    nn.Conv2d(4, 6, 3, padding=1),
    nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(1, 2), groups=2),
    nn.Conv2d(4, 4, 5, padding=2, groups=4),  # depthwise, windows wider than the edges
    nn.Conv2d(4, 2, (3, 2), padding="same", dilation=2),  # asymmetric padding
    nn.Conv2d(4, 6, 3, stride=2),  # no padding: every tap in bounds
    nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(4, 6, 3, stride=2, padding=2, padding_mode="circular"),
    nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate"),
], ids=["pad1", "strided-dilated-grouped", "depthwise", "same", "valid", "reflect", "circular",
        "replicate"])
def test_conv_counts_only_taps_that_read_an_input(layer: nn.Conv2d) -> None:
    """Zero padding is no input: its taps are neither the twin's MACs nor (no spike there) the
    spiking model's accumulates. Other pads copy real inputs, so their taps count."""
    gen = torch.Generator().manual_seed(3)
    spikes = (torch.rand(2, 4, 7, 6, generator=gen) < 0.4).float()
    dense, acs, active = count_layer(layer, spikes)
    assert (dense, acs) == _taps_by_hand(layer, spikes)
    assert active == int(spikes.sum())
    everywhere = torch.ones(2, 4, 7, 6)  # every tap that reads an input reads a spike
    assert count_layer(layer, everywhere)[1] == count_layer(layer, everywhere)[0]
    # the same count from the layer itself: all-ones weights on an all-ones input, no bias
    ones = copy.deepcopy(layer)
    nn.init.ones_(ones.weight)
    ones.bias = None
    with torch.no_grad():
        assert int(ones(everywhere).sum()) == dense


def test_a_silent_spiking_model_reports_unbounded_ratios_in_valid_json() -> None:
    """A SpikeGPT whose neurons never fire does no synaptic operation: the figures that divide
    by its operations are unbounded (not a crash), the note says why, and the result is still
    JSON that reads back."""
    torch.manual_seed(0)
    snn, twin = RWKVLM(16, 1, spiking=True), RWKVLM(16, 1, spiking=False)
    for m in snn.modules():
        if isinstance(m, LIF):
            m.threshold.fill_(1e9)  # type: ignore[operator]
    x = torch.randint(0, char_lm.VOCAB, (2, 12))
    with OpCounter(snn) as ops, OpCounter(twin) as twin_ops, torch.no_grad():
        snn(x)
        twin(x)
    assert ops.counts.acs == ops.counts.macs == 0 and twin_ops.counts.macs > 0
    figures = job._figures(twin_ops.counts, ops.counts, x.numel())
    assert figures["op_ratio"] == figures["energy_ratio"] == math.inf
    # the neuron updates still cost something
    assert 0 < figures["energy_ratio_with_neurons"] < math.inf
    assert "no synaptic operation" in figures["energy_note"]
    res = SpikingResult(model="char-rwkv", metric="bits_per_char", twin_quality=7.0,
                        spiking_quality=7.0, quality_gap=0.0, parameters=1, per="token",
                        time_steps=None, layers=[], spike_rates={}, wall_ms_twin=1.0,
                        wall_ms_spiking=1.0, train_seconds=0.0, seconds=0.0, method="",
                        environment=env.environment(torch.device("cpu")), **figures)

    def strict(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    text = res.model_dump_json()
    assert json.loads(text, parse_constant=strict)["energy_ratio"] == "Infinity"
    assert SpikingResult.model_validate_json(text).energy_ratio == math.inf
    assert job._ratio(0.0, 0.0) != job._ratio(0.0, 0.0)  # 0 / 0: NaN, nothing to compare


def test_evaluation_runs_in_ieee_fp32() -> None:
    """The quality figures are computed without TF32 (cuDNN's default for fp32 convolutions on
    a GPU), so the saved model scores the same on the CPU; training is left as it is."""
    seen: list[tuple[str, str]] = []

    class Probe(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((torch.backends.cudnn.conv.fp32_precision,  # type: ignore[attr-defined]
                         torch.backends.cuda.matmul.fp32_precision))
            return super().forward(x)

    probe = Probe(3, 2)
    before = (torch.backends.cudnn.conv.fp32_precision,  # type: ignore[attr-defined]
              torch.backends.cuda.matmul.fp32_precision)
    x = torch.ones(4, 3)
    quality, counts = job._counted(probe, lambda: float(probe(x).detach().sum()))
    assert seen == [("ieee", "ieee")] and counts.layers[""].acs == 4 * 3 * 2
    assert quality == float(nn.functional.linear(x, probe.weight, probe.bias).detach().sum())
    assert (torch.backends.cudnn.conv.fp32_precision,  # type: ignore[attr-defined]
            torch.backends.cuda.matmul.fp32_precision) == before


def test_mix_linear_on_spikes_is_accumulates_only() -> None:
    """What the counter charges is a real computation: adding weight columns for each spike
    (now, scaled by mu; next token, by 1 - mu) reproduces the layer's output."""
    gen = torch.Generator().manual_seed(1)
    mix = MixLinear(6, 4, torch.rand(6, generator=gen))
    s = (torch.rand(2, 5, 6, generator=gen) < 0.3).float()
    now, later = mix.weight * mix.mu, mix.weight * (1 - mix.mu)
    acc = torch.zeros(2, 5, 4)
    adds = 0
    for b, t, c in s.nonzero().tolist():
        acc[b, t] += now[:, c]
        adds += 4
        if t + 1 < 5:
            acc[b, t + 1] += later[:, c]
            adds += 4
    torch.testing.assert_close(acc, mix(s).detach())
    assert adds == count_layer(mix, s)[1]


def test_wkv_recurrence_matches_its_definition() -> None:
    gen = torch.Generator().manual_seed(2)
    b, t, c = 2, 9, 5
    w, u = torch.randn(c, generator=gen).double(), torch.randn(c, generator=gen).double()
    k, v = torch.randn(b, t, c, generator=gen).double() * 4, torch.randn(b, t, c, generator=gen).double()
    want = torch.zeros(b, t, c, dtype=torch.float64)
    for j in range(t):
        weights = [torch.exp(k[:, i] - (j - 1 - i) * torch.exp(w)) for i in range(j)]
        weights.append(torch.exp(u + k[:, j]))
        want[:, j] = sum(wi * v[:, i] for i, wi in enumerate(weights)) / sum(weights)
    torch.testing.assert_close(wkv(w, u, k, v), want)


def test_spikegpt_reads_only_spikes_and_has_its_twins_parameters() -> None:
    torch.manual_seed(0)
    snn, twin = RWKVLM(32, 2, spiking=True), RWKVLM(32, 2, spiking=False)
    assert ([(n, p.shape) for n, p in snn.named_parameters()]
            == [(n, p.shape) for n, p in twin.named_parameters()])
    x = torch.randint(0, char_lm.VOCAB, (3, 20))
    with OpCounter(snn) as ops, torch.no_grad():
        snn(x)
    assert ops.counts.layers and all(r.binary for r in ops.counts.layers.values())
    assert ops.counts.macs == 0 and ops.counts.acs > 0
    assert len(ops.counts.neurons) == 2 * 4 + 1
    with OpCounter(twin) as ops2, torch.no_grad():
        twin(x)
    assert ops2.counts.acs == 0 and ops2.counts.macs == ops.counts.dense_macs


def test_conversion_keeps_the_cnn_before_fine_tuning(shared_store: Path) -> None:
    ann, _ = zoo.digits_cnn(zoo_store(shared_store))
    tr, te = datasets.digits("train"), datasets.digits("test")
    assert tr.labels is not None and te.labels is not None
    snn, info = conv.convert(ann, tr.inputs["x"], tr.labels, time_steps=16, beta=1.0, epochs=0)
    ann_acc = conv.accuracy(ann, te.inputs["x"], te.labels)
    # integrate-and-fire rates approximate the ReLUs once thresholds are folded into weights
    assert conv.accuracy(snn, te.inputs["x"], te.labels) >= ann_acc - 0.03
    seen: list[torch.Tensor] = []
    for m in snn.body:
        if isinstance(m, LIF):
            m.register_forward_hook(lambda _m, _a, out: seen.append(out.unique()))
    conv.accuracy(snn, te.inputs["x"][:64], te.labels[:64])
    assert len(seen) == 4 and all(set(u.tolist()) == {0.0, 1.0} for u in seen)  # exactly binary
    assert info["converted_train_accuracy"] > 0.9
    with pytest.raises(UserError, match="GELU"):
        conv.stages_of(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.ReLU()))


def test_a_relu_instance_used_twice_is_converted_at_both_places() -> None:
    """``nn.Sequential(lin, act, lin, act, lin)`` with one shared ``act`` is a common way to
    write an MLP: each of its positions is a spiking layer, not only the first."""
    act = nn.ReLU()
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(4, 16), act, nn.Linear(16, 16), act, nn.Linear(16, 3))
    kinds = [type(m).__name__ for m in conv.stages_of(ann)]
    assert kinds == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    snn = conv.SpikingClassifier(conv.stages_of(ann), time_steps=4, beta=1.0)
    assert sum(isinstance(m, LIF) for m in snn.body) == 2


def test_classifier_job_and_its_artifact(tmp_path: Path, shared_store: Path) -> None:
    ctx = LocalContext(tmp_path, store=zoo_store(shared_store))
    res = job.run(SpikingSpec(model="digits-cnn", epochs=3), ctx)
    assert res.metric == "accuracy" and res.per == "sample" and res.time_steps == 4
    assert res.quality_gap == pytest.approx(res.twin_quality - res.spiking_quality)
    assert res.quality_gap < 0.03
    assert [r.input for r in res.layers] == ["analog"] + ["spikes"] * 4  # conv1 reads pixels
    assert res.op_ratio == pytest.approx(res.twin_macs / (res.spiking_acs + res.spiking_macs))
    assert res.energy_ratio > 1 and 0 < min(res.spike_rates.values()) < max(res.spike_rates.values()) < 1
    art = tmp_path / "artifacts"
    model = job.load_bytes((art / "spiking.json").read_bytes(),
                           (art / "spiking.safetensors").read_bytes())
    te = datasets.digits("test")
    assert te.labels is not None
    assert conv.accuracy(model, te.inputs["x"], te.labels) == res.spiking_quality
    assert json.loads((art / "operations.json").read_bytes())[1]["spiking_acs"] > 0


def test_language_job_reports_bits_per_char_and_samples(tmp_path: Path) -> None:
    ctx = LocalContext(tmp_path)  # 10 steps, the smallest a spec takes (its warm-up once divided by 0)
    res = job.run(SpikingSpec(model="char-rwkv", steps=10, samples=1, sample_length=24), ctx)
    assert res.metric == "bits_per_char" and res.per == "token"
    assert 0 < res.twin_quality < 7 and res.spiking_quality > 0  # untrained: log2(128) = 7
    assert res.quality_gap == pytest.approx(res.spiking_quality - res.twin_quality)
    assert all(r.input == "spikes" for r in res.layers) and res.spiking_macs == 0
    assert len(res.samples) == 1 and len(res.samples[0].spiking) == 24
    art = tmp_path / "artifacts"
    model = job.load_bytes((art / "spiking.json").read_bytes(),
                           (art / "spiking.safetensors").read_bytes())
    assert math.log2(char_lm.held_out_perplexity(model)) == pytest.approx(res.spiking_quality,
                                                                          rel=1e-6)
