"""Values a spec's fields take one by one but the engine cannot run: refused when the job is
created, with a message that says what to change (each one crashed a job before)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from app.schemas import (
    BenchmarkSpec,
    FewStepDistillSpec,
    IntrinsicDimensionSpec,
    JobSpec,
    LossBenchmarkSpec,
    MixedPrecisionSpec,
    ModelRef,
    SensitivityOptions,
    SensitivitySpec,
    SpikingSpec,
)

ZOO = ModelRef(zoo="digits-cnn")


def test_seeds_stay_in_the_range_the_engine_offsets() -> None:
    # 2**64 - 1 overflowed torch's generator once the engine added its per-stream offset
    for bad in (2**64 - 1, 2**32, -1):
        with pytest.raises(ValidationError, match="seed"):
            SpikingSpec(seed=bad)
        with pytest.raises(ValidationError, match="seeds"):
            IntrinsicDimensionSpec(seeds=[0, bad])
    assert SpikingSpec(seed=2**32 - 1).seed == 2**32 - 1


def test_dependency_weight_is_finite() -> None:
    # inf * 0 made NaN scores, which the stored result could not be read back with
    for bad in (float("inf"), float("nan"), 1e400, 1e7):
        with pytest.raises(ValidationError, match="dependency_weight"):
            SensitivityOptions(dependency_weight=bad)
    assert SensitivityOptions(dependency_weight=1e6).dependency_weight == 1e6


def test_a_relative_budget_on_mse_is_refused_at_submit() -> None:
    # the engine refused it too, but only once a worker had loaded the model
    with pytest.raises(ValidationError, match='give mode "absolute"'):
        MixedPrecisionSpec(model=ZOO, budget={"metric": "mse"})
    spec = MixedPrecisionSpec(model=ZOO, budget={"metric": "mse", "mode": "absolute",
                                                 "value": 0.001})
    assert spec.budget.metric == "mse"


def test_a_random_input_must_fit_a_worker() -> None:
    with pytest.raises(ValidationError, match=r"268,435,456 \(1 GiB of float32\)"):
        BenchmarkSpec(model=ZOO, input_shape=[65536, 65536, 65536])
    assert BenchmarkSpec(model=ZOO, input_shape=[4096, 65536]).input_shape == [4096, 65536]


@pytest.mark.parametrize("spec, field", [
    (FewStepDistillSpec().model_dump() | {"methods": ["slam", "slam"]}, "methods"),
    (FewStepDistillSpec().model_dump() | {"steps": [16, 16]}, "steps"),
    (IntrinsicDimensionSpec().model_dump() | {"seeds": [0, 0]}, "seeds"),
    (LossBenchmarkSpec().model_dump() | {"vocab_sizes": [5, 5]}, "vocab_sizes"),
    (LossBenchmarkSpec().model_dump() | {"impls": ["torch", "torch"]}, "impls"),
    (MixedPrecisionSpec(model=ZOO).model_dump() | {"levels": ["int8", "int8"]}, "levels"),
    (MixedPrecisionSpec(model=ZOO).model_dump() | {"baselines": ["random", "random"]},
     "baselines"),
])
def test_a_repeated_option_or_size_is_refused(spec: dict[str, Any], field: str) -> None:
    # four identical rows and artifacts written twice, before
    with pytest.raises(ValidationError, match=rf"{field}\n.*each value may appear once"):
        TypeAdapter(JobSpec).validate_python(spec)


def test_sensitivity_to_fp32_is_refused() -> None:
    # every perturbation, term and score was 0, and the ranks just followed the layer order
    with pytest.raises(ValidationError, match="fp32 is the reference"):
        SensitivitySpec(model=ZOO, precision="fp32")
    assert SensitivitySpec(model=ZOO, precision="int4").precision == "int4"


@pytest.mark.parametrize("kind", ["benchmark", "sensitivity", "mixed_precision"])
def test_a_zoo_model_with_a_builtin_dataset_it_cannot_read_is_refused(kind: str) -> None:
    # these were accepted and failed in the worker after loading the model
    spec = TypeAdapter(JobSpec)
    for model, dataset, hint in (("digits-cnn", "sentences", "use digits-test or digits-calib"),
                                 ("minilm-l6", "digits-test", "use sentences"),
                                 ("char-gpt", "digits-calib", "leave `dataset` out")):
        with pytest.raises(ValidationError, match=f"cannot read the built-in dataset {dataset}; "
                                                  f"{hint}"):
            spec.validate_python({"kind": kind, "model": {"zoo": model},
                                  "dataset": {"builtin": dataset}})
    for model, dataset in (("digits-cnn", "digits-calib"), ("minilm-l6", "sentences")):
        ok = spec.validate_python({"kind": kind, "model": {"zoo": model},
                                   "dataset": {"builtin": dataset}})
        assert ok.dataset is not None and ok.dataset.builtin == dataset
    # uploads are checked when a worker reads them
    assert spec.validate_python({"kind": kind, "model": {"zoo": "char-gpt"}}).dataset is None


def test_onnxruntime_cannot_mix_static_and_dynamic_int8() -> None:
    # ORT built an invalid model ("Duplicate definition of name (view_quantized)") for a static
    # conv before a dynamic Linear, and the job failed at its latency gate
    with pytest.raises(ValidationError, match="cannot mix int8 \\(dynamic\\) and int8-static"):
        MixedPrecisionSpec(model=ZOO, levels=["int8-static", "int8", "int4"])
    assert MixedPrecisionSpec(model=ZOO, levels=["int8-static", "int4"]).levels


@pytest.mark.parametrize("kind", ["sensitivity", "mixed_precision"])
def test_a_metric_that_scores_labels_needs_data_with_labels(kind: str) -> None:
    # MiniLM returns pooled embeddings and the sentences carry no labels: the worker refused
    # these after loading the model
    spec = TypeAdapter(JobSpec)

    def make(model: str, dataset: str | None, metric: str) -> Any:
        body: dict[str, Any] = {"kind": kind, "model": {"zoo": model}}
        if dataset:
            body["dataset"] = {"builtin": dataset}
        if kind == "sensitivity":
            body["metric"] = metric
        else:
            body["budget"] = {"metric": metric, "mode": "absolute", "value": 0.1}
        return spec.validate_python(body)

    for model, dataset in (("minilm-l6", None), ("minilm-l6", "sentences")):
        for metric in ("accuracy", "perplexity"):
            with pytest.raises(ValidationError, match=f"metric {metric} scores labels"):
                make(model, dataset, metric)
        assert make(model, dataset, "cosine")
    assert make("digits-cnn", "digits-test", "accuracy")
    assert make("char-gpt", None, "perplexity")


def test_lora_recovery_with_static_levels_is_refused() -> None:
    # the worker refused it after loading the model and exporting it to ONNX
    with pytest.raises(ValidationError, match="LoRA recovery needs dynamic levels"):
        MixedPrecisionSpec(model=ZOO, levels=["int8-static", "int4"], lora={})
    assert MixedPrecisionSpec(model=ZOO, levels=["int8", "int4"], lora={}).lora
