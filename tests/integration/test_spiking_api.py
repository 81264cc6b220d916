"""The spiking job through the API: the converted digits CNN and the SpikeGPT language model,
each against its twin, with the artifacts that rebuild the spiking model."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelpress import SpikingResult, SpikingSpec, UnprocessableEntityError
from tests.conftest import Stack
from workers.engine import datasets
from workers.engine.spiking import convert, job

pytestmark = pytest.mark.slow


def test_spiking_cnn_and_language_model(stack: Stack, tmp_path: Path) -> None:
    with stack.client() as client:
        cnn = client.jobs.create(SpikingSpec(model="digits-cnn", epochs=2))
        lm = client.jobs.create(SpikingSpec(model="char-rwkv", steps=10, samples=2,
                                            sample_length=20))
        done = client.jobs.wait(cnn.id, timeout=300)
        res = done.result
        assert isinstance(res, SpikingResult), done.error
        assert res.metric == "accuracy" and res.twin_quality > 0.9 and res.quality_gap < 0.05
        assert res.op_ratio > 1 and res.energy_ratio > 1 and "estimate" in res.energy_note
        names = {a.name for a in done.artifacts}
        assert {"spiking.safetensors", "spiking.json", "operations.json"} <= names
        model = job.load_bytes(client.jobs.download(cnn.id, "spiking.json", tmp_path).read_bytes(),
                               client.jobs.download(cnn.id, "spiking.safetensors",
                                                    tmp_path).read_bytes())
        te = datasets.digits("test")
        assert te.labels is not None
        assert convert.accuracy(model, te.inputs["x"], te.labels) == res.spiking_quality

        done = client.jobs.wait(lm.id, timeout=600)
        res = done.result
        assert isinstance(res, SpikingResult), done.error
        assert res.metric == "bits_per_char" and res.per == "token"
        assert res.quality_gap == pytest.approx(res.spiking_quality - res.twin_quality)
        assert len(res.samples) == 2 and res.op_ratio > 0 and res.spike_rates
        assert any("trained spikegpt on cpu: 10 steps" in line for line in client.jobs.log(lm.id))

        with pytest.raises(UnprocessableEntityError, match="model"):
            client.jobs.create({"kind": "spiking", "model": "resnet-50"})
        with pytest.raises(UnprocessableEntityError, match="beta"):
            client.jobs.create({"kind": "spiking", "beta": 1.5})
