"""A spec that names an uploaded dataset a worker would refuse (the API has its tensors' names
and shapes from the upload) is a 422 at submit that says what to change, not a job that queues,
loads the model and then fails. Against a real Redis and Celery producer (no worker)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from app import assets, jobs, records
from app.config import Settings
from app.deps import Services
from app.errors import ApiError
from app.schemas import DatasetInfo, JobCreate, ModelInfo, TensorInfo
from tests.app.conftest import TENANT, run


async def dataset(svc: Services, n: int, labeled: bool) -> str:
    """A recorded upload of ``n`` samples, with labels `y` if ``labeled``."""
    tensors = {"x": TensorInfo(shape=[n, 16], dtype="float32")}
    if labeled:
        tensors["y"] = TensorInfo(shape=[n], dtype="int64")
    info = DatasetInfo(id=f"dst_{uuid.uuid4().hex}", name="d", format="npz", size=3,
                       sha256="0" * 64, created_at=records.now(), tensors=tensors)
    svc.store.put_bytes(records.dataset_object(TENANT, info.id, "npz"), b"abc")
    await assets._recorded(svc, "datasets", TENANT, info)
    return info.id


MODEL = {"zoo": "digits-cnn"}
UPLOADED_MODEL = "mdl_" + "0" * 32
SPECS: list[tuple[dict[str, Any], int, bool, str]] = [
    # (spec without its dataset, samples, labeled, what the 422 says)
    ({"kind": "sensitivity", "model": MODEL, "metric": "accuracy"}, 64, False,
     "metric accuracy scores labels, but dataset .* has none"),
    ({"kind": "mixed_precision", "model": MODEL,
      "budget": {"metric": "perplexity", "mode": "absolute", "value": 1}}, 64, False,
     "metric perplexity scores labels, but dataset .* has none"),
    ({"kind": "intrinsic_dimension", "model": {"id": UPLOADED_MODEL}}, 64, False,
     "intrinsic_dimension measures accuracy: dataset .* needs labels"),
    ({"kind": "intrinsic_dimension", "model": {"id": UPLOADED_MODEL}}, 9, True,
     "has 9 samples; intrinsic_dimension needs at least 10"),
    ({"kind": "benchmark", "model": MODEL, "batch_size": 32}, 8, False,
     "dataset .* has 8 samples, fewer than batch_size 32"),
]


@pytest.mark.parametrize("spec, samples, labeled, message", SPECS)
def test_a_dataset_the_job_cannot_use_is_refused_at_submit(
        settings: Settings, spec: dict[str, Any], samples: int, labeled: bool,
        message: str) -> None:
    async def body_(svc: Services) -> None:
        data = await dataset(svc, samples, labeled)
        if spec["kind"] == "intrinsic_dimension":  # an uploaded model: record one
            await assets._recorded(svc, "models", TENANT, ModelInfo(
                id=UPLOADED_MODEL, name="m", format="pt2", size=1, sha256="0" * 64,
                created_at=records.now()))
        body = JobCreate.model_validate({"spec": {**spec, "dataset": {"id": data}}})
        with pytest.raises(ApiError, match=message) as caught:
            await jobs.create_job(svc, TENANT, body)
        assert caught.value.status == 422
        assert not await svc.redis.zcard(records.tenant_jobs_key(TENANT))  # nothing written
        # what the message asks for is taken
        fixed = await dataset(svc, max(samples, 64), True)
        body = JobCreate.model_validate({"spec": {**spec, "dataset": {"id": fixed}}})
        job, created = await jobs.create_job(svc, TENANT, body)
        assert created and job.state == "queued"

    run(settings, body_)


def test_an_unlabeled_dataset_with_the_default_or_an_output_metric_is_taken(
        settings: Settings) -> None:
    async def body_(svc: Services) -> None:
        data = {"id": await dataset(svc, 4, False)}
        for spec in ({"kind": "sensitivity", "model": MODEL, "dataset": data},
                     {"kind": "sensitivity", "model": MODEL, "dataset": data, "metric": "cosine"},
                     {"kind": "mixed_precision", "model": MODEL, "dataset": data,
                      "budget": {"metric": "mse", "mode": "absolute", "value": 0.1}},
                     {"kind": "benchmark", "model": MODEL, "dataset": data, "batch_size": 4}):
            job, created = await jobs.create_job(svc, TENANT, JobCreate.model_validate(
                {"spec": spec}))
            assert created and job.state == "queued"

    run(settings, body_)


def test_lora_with_the_default_static_levels_of_a_conv_model_is_refused(
        settings: Settings) -> None:
    # onnxruntime-cpu's default levels for digits-cnn start with int8-static, which LoRA
    # recovery cannot take: the worker refused it after loading and exporting the model
    async def body_(svc: Services) -> None:
        spec: dict[str, Any] = {"kind": "mixed_precision", "model": MODEL, "lora": {}}
        with pytest.raises(ApiError, match=r"LoRA recovery needs dynamic levels.*\["
                                           r"\"int8\", \"int4\"\]") as caught:
            await jobs.create_job(svc, TENANT, JobCreate.model_validate({"spec": spec}))
        assert caught.value.status == 422
        for fixed in ({"levels": ["int8", "int4"]}, {"backend": "torch-cpu"}):
            _, created = await jobs.create_job(svc, TENANT, JobCreate.model_validate(
                {"spec": {**spec, **fixed}}))
            assert created

    run(settings, body_)
