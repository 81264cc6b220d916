from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.config import Settings
from workers.celery_app import create_celery, validate


def test_visibility_timeout_must_exceed_time_limit() -> None:
    with pytest.raises(ValidationError, match="VISIBILITY_TIMEOUT_S"):
        Settings(task_time_limit_s=3600, visibility_timeout_s=3600)


def test_celery_config_follows_settings() -> None:
    s = Settings(redis_url="redis://127.0.0.1:1/0", task_time_limit_s=100, visibility_timeout_s=150)
    app = create_celery(s)
    validate(app)
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.task_time_limit == 100
    assert app.conf.broker_transport_options["visibility_timeout"] == 150
    assert {q.name for q in app.conf.task_queues} == {"cpu", "gpu"}
    app.conf.broker_transport_options = {"visibility_timeout": 50}
    with pytest.raises(RuntimeError, match="visibility_timeout"):
        validate(app)


def test_store_url_default_and_worker_queues(tmp_path: object) -> None:
    s = Settings(data_dir="/srv/mp")  # type: ignore[arg-type]
    assert s.resolved_store_url() == "file:///srv/mp/store"
    assert s.queues_for_worker(has_cuda=False) == ["cpu"]
    assert s.queues_for_worker(has_cuda=True) == ["cpu", "gpu"]
    assert Settings(worker_queues="gpu").queues_for_worker(has_cuda=True) == ["gpu"]


def test_jobs_that_need_a_gpu_go_to_the_gpu_queue() -> None:
    from types import SimpleNamespace
    from typing import cast

    from app.deps import Services
    from app.jobs import queue_for
    from app.schemas import (
        FewStepDistillSpec,
        IntrinsicDimensionSpec,
        LossBenchmarkSpec,
        MixedPrecisionSpec,
        ModelRef,
        SpikingSpec,
    )

    svc = cast(Services, SimpleNamespace(settings=Settings()))
    digits = ModelRef(zoo="digits-cnn")
    assert queue_for(svc, MixedPrecisionSpec(model=digits, backend="torch-cuda")) == "gpu"
    assert queue_for(svc, MixedPrecisionSpec(model=digits, backend="torch-cpu")) == "cpu"
    assert queue_for(svc, MixedPrecisionSpec(model=digits)) == "cpu"
    assert queue_for(svc, LossBenchmarkSpec(device="cuda")) == "gpu"
    for spec in (IntrinsicDimensionSpec, SpikingSpec, FewStepDistillSpec):
        assert queue_for(svc, spec(device="cuda")) == "gpu"
        assert queue_for(svc, spec()) == queue_for(svc, spec(device="cpu")) == "cpu"
