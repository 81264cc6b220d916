"""The zoo's language model (char-gpt), its data and the perplexity metric, and a mixed-precision
job that keeps perplexity within budget on ONNX Runtime."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.schemas import MixedPrecisionSpec
from app.storage import open_store
from tests.helpers import measured
from workers.engine import char_lm, mixed_precision, zoo
from workers.engine.context import LocalContext
from workers.engine.quant.task import METRICS


def test_windows_are_next_character_pairs() -> None:
    data = char_lm.windows("test", 10)
    x, y = data.inputs["x"], data.labels
    assert y is not None and x.shape == y.shape == (10, char_lm.CONTEXT)
    assert torch.equal(x[:, 1:], y[:, :-1])  # labels are the inputs shifted by one
    assert int(x.max()) < char_lm.VOCAB and int(x.min()) >= 0
    # Held-out text does not overlap the training text.
    assert len(char_lm.split("train")) + len(char_lm.split("test")) == len(char_lm.corpus_ids())


def test_perplexity_metric() -> None:
    targets = torch.randint(0, char_lm.VOCAB, (3, 5))
    uniform = torch.zeros(3, 5, char_lm.VOCAB)
    assert char_lm.perplexity(uniform, targets) == pytest.approx(char_lm.VOCAB)
    logits = torch.randn(3, 5, char_lm.VOCAB)
    logp = logits.double().log_softmax(-1).gather(-1, targets[..., None])
    expected = math.exp(-float(logp.mean()))
    metric, higher_is_better = METRICS["perplexity"]
    assert not higher_is_better
    assert metric(logits, targets, logits) == pytest.approx(expected, rel=1e-9)
    assert char_lm.perplexity(logits, targets) == pytest.approx(expected, rel=1e-9)


def test_trained_char_gpt_beats_unigram(shared_store: Path) -> None:
    model, meta = zoo.char_gpt(open_store(Settings(store_url=shared_store.as_uri())))
    test = char_lm.windows("test")
    assert test.labels is not None
    with torch.inference_mode():
        ppl = char_lm.perplexity(model(test.inputs["x"]), test.labels)
    assert ppl == pytest.approx(meta["test_perplexity"], rel=1e-5)  # reloaded = trained
    counts = torch.bincount(char_lm.split("train"), minlength=char_lm.VOCAB).double() + 1
    unigram = math.exp(-float((counts / counts.sum()).log()[test.labels.reshape(-1)].mean()))
    measured.append(f"char-gpt: held-out perplexity {ppl:.2f} on {len(test)} windows (unigram "
                    f"{unigram:.1f}); trained in {meta['train_seconds']:.0f} s")
    assert ppl < 10 < unigram  # 7.5 vs 30 (EPYC): it learned more than character frequencies


@pytest.mark.slow
def test_mixed_precision_on_char_gpt_keeps_perplexity(tmp_path: Path, shared_store: Path) -> None:
    spec = MixedPrecisionSpec.model_validate({
        "model": {"zoo": "char-gpt"}, "eval_samples": 64, "batch_size": 8, "repeats": 5,
        "warmup": 1, "frontier_points": 3, "baselines": ["uniform"],
        "sensitivity": {"probes": 2, "calibration_samples": 32}})
    ctx = LocalContext(tmp_path, store=open_store(Settings(store_url=shared_store.as_uri())))
    res = mixed_precision.run(spec, ctx)
    assert res.metric == "perplexity" and not res.higher_is_better
    # Tr(H) of the next-token cross-entropy (labels): double backward, never Gauss-Newton.
    assert res.hessian == "double-backward"
    assert all(s.hessian_trace > 0 for s in res.sensitivity), res.sensitivity
    assert res.threshold == pytest.approx(res.baseline.deployed_metric * 1.001)
    assert res.levels == ["int8", "int4"]  # no convolutions: dynamic int8
    assert res.chosen.within_budget and res.chosen.deployed_metric is not None
    assert res.chosen.deployed_metric <= res.threshold
    for p in res.frontier:  # the deployed model scores what the simulation predicted
        assert p.deployed_metric == pytest.approx(p.simulated_metric, rel=2e-3), p.label
