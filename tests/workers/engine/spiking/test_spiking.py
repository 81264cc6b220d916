"""Spiking building blocks: binary spikes, the operation counter against hand counts (and
against an accumulate-only evaluation), the WKV recurrence, conversion and the job."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from app.config import Settings
from app.schemas import SpikingSpec
from app.storage import Store, open_store
from gpu_kernels.lif import lif_reference
from workers.engine import char_lm, datasets, zoo
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
    assert count_layer(conv3, corner) == (9 * 2 * 9, 4 * 2, 1)
    center = torch.zeros(1, 1, 3, 3)
    center[0, 0, 1, 1] = 1  # read by all 9 outputs
    assert count_layer(conv3, center)[1] == 9 * 2
    strided = nn.Conv2d(1, 3, 3, stride=2, padding=1)
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 1  # outputs (0..1, 0..1) all cover row 1 / col 1
    assert count_layer(strided, x) == (4 * 3 * 9, 4 * 3, 1)
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
