"""The artifact round trip against a real S3-protocol server (moto's, over HTTP), configured with
the same settings a production deployment sets."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.schemas import BenchmarkSpec, ModelRef
from modelpress import _stack
from tests.conftest import Stack, make_stack, running
from tests.helpers import export_tiny
from tests.s3 import Moto, serving

pytestmark = pytest.mark.slow

BUCKET = "modelpress-artifacts"


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    yield from serving(BUCKET)


@pytest.fixture(scope="module")
def s3_stack(tmp_path_factory: pytest.TempPathFactory, redis_server: _stack.EmbeddedRedis,
             moto: Moto) -> Iterator[Stack]:
    yield from running(make_stack(tmp_path_factory.mktemp("s3stack"), redis_server,
                                  moto.env(f"s3://{BUCKET}/prod")))


def test_artifact_round_trip_through_s3(s3_stack: Stack, moto: Moto, tmp_path: Path) -> None:
    s3 = moto.client()
    with s3_stack.client() as client:
        model = client.models.upload(export_tiny(tmp_path / "tiny.pt2"), name="tiny")
        job = client.jobs.create(BenchmarkSpec(model=ModelRef(id=model.id), batch_size=8,
                                               repeats=10))
        done = client.jobs.wait(job.id, timeout=120)
        assert done.state == "succeeded"
        got = client.jobs.download(job.id, "benchmark.json", tmp_path).read_bytes()

        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="prod/")["Contents"]]
        [model_key] = [k for k in keys if model.id in k]
        [art_key] = [k for k in keys if job.id in k and k.endswith("/benchmark.json")]
        assert s3.get_object(Bucket=BUCKET, Key=art_key)["Body"].read() == got
        uploaded = s3.get_object(Bucket=BUCKET, Key=model_key)["Body"].read()
        assert uploaded == (tmp_path / "tiny.pt2").read_bytes()
        # Nothing went to a local store folder instead.
        assert not (s3_stack.root / "store").exists()

        # Deleting removes the objects from the bucket (one DeleteObjects call per 1000 keys).
        job_keys = [k for k in keys if job.id in k]
        assert client.jobs.delete(job.id).files_removed == len(job_keys) >= 2
        assert client.models.delete(model.id).files_removed == 1
    left = s3.list_objects_v2(Bucket=BUCKET, Prefix="prod/").get("Contents", [])
    assert not [o["Key"] for o in left if job.id in o["Key"] or model.id in o["Key"]]


def test_readyz_reports_a_missing_bucket(tmp_path: Path, redis_server: _stack.EmbeddedRedis,
                                        moto: Moto) -> None:
    s = make_stack(tmp_path, redis_server, moto.env("s3://no-such-bucket"))
    s.start_api()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"{s.base_url}/readyz", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert r.status_code == 503
        assert not r.json()["checks"]["store"].startswith("ok")
    finally:
        s.stop()
