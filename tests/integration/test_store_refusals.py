"""The object store's failures as users and operators meet them, against real parts: a real
Redis, moto's S3 server over HTTP (with its access checks switched on to play a store that
answers 403, as S3 does to a wrong key or a missing permission), and a local store whose writer
is killed mid-write."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from moto import settings as moto_settings
from pydantic import SecretStr

from app import records
from app.auth import create_key
from app.config import Settings
from app.main import create_app
from app.storage import StoreError, StoreUnavailable, open_store
from modelpress import _stack
from tests.conftest import fresh_db
from tests.s3 import CREDS, Moto, serving
from workers.runner import WorkerContext

BUCKET = "modelpress-review"


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    yield from serving(BUCKET)


@contextmanager
def access_denied() -> Iterator[None]:
    """moto checks every request's key from now on; ours is none of its IAM users' keys, so
    every call is answered 403, as S3 answers a wrong or revoked key."""
    before = moto_settings.INITIAL_NO_AUTH_ACTION_COUNT
    moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    try:
        yield
    finally:
        moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = before


def s3_settings(moto: Moto, store_url: str, **extra: object) -> Settings:
    return Settings(
        store_url=store_url, s3_endpoint=moto.endpoint, s3_region="us-east-1",
        s3_access_key_id=CREDS["aws_access_key_id"],
        s3_secret_access_key=SecretStr(CREDS["aws_secret_access_key"]), s3_allow_http=True,
        rate_limit_per_minute=0, **extra)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the store's own errors


def test_a_store_that_answers_403_fails_as_a_store_error(moto: Moto) -> None:
    """A 403 is obstore's PermissionDeniedError, not a GenericError: it went past every handler,
    so a job failed as `PermissionDeniedError` with a traceback and a download was a 500."""
    store = open_store(s3_settings(moto, f"s3://{BUCKET}/denied", store_retry_s=30), retry=True)
    store.put_bytes("k", b"abc")
    with access_denied():
        t0 = time.monotonic()
        for call in (lambda: store.put_bytes("k2", b"x"), lambda: store.get_bytes("k"),
                     lambda: store.exists("k"), lambda: store.list_keys("")):
            with pytest.raises(StoreError) as err:
                call()
            assert not isinstance(err.value, StoreUnavailable)  # refused: no retrying
            assert err.value.type == "store_error" and f"s3://{BUCKET}/denied" in str(err.value)
        with pytest.raises(StoreError, match="403"):
            asyncio.run(store.open_stream("k"))
        assert time.monotonic() - t0 < 10  # at once, not after store_retry_s of retries


def test_a_write_to_a_missing_bucket_names_the_bucket(moto: Moto) -> None:
    """S3 answers a put into a missing bucket 404, which obstore raises as FileNotFoundError:
    a job failed as `FileNotFoundError` instead of a store error."""
    store = open_store(s3_settings(moto, "s3://no-such-bucket/x", store_retry_s=30), retry=True)
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="does the bucket exist"):
        store.put_bytes("k", b"abc")
    # a job's first call lists its input: S3's 404 to it was retried as an outage for
    # store_retry_s (3 minutes by default), then reported as `store_unavailable`
    with pytest.raises(StoreError, match="404") as err:
        store.list_keys("tenants/")
    assert not isinstance(err.value, StoreUnavailable)
    assert time.monotonic() - t0 < 10
    with pytest.raises(StoreError, match="does the bucket exist"):
        asyncio.run(store.put_file_async("k", Path(__file__)))


def test_s3_on_aws_with_the_instance_role_starts(tmp_path: Path) -> None:
    """No endpoint (AWS itself) or no keys (the instance's role, AWS_* variables): obstore
    refuses None, so the API and workers died at start-up with "TypeError: 'None' is not an
    instance of 'str'"; only a setup that sets every S3 setting (as the tests do) started."""
    for extra in ({}, {"s3_endpoint": "https://s3.example.com"},
                  {"s3_access_key_id": "AKID", "s3_secret_access_key": SecretStr("s")}):
        store = open_store(Settings(data_dir=tmp_path, store_url="s3://my-bucket/prod",
                                    **extra))  # type: ignore[arg-type]
        assert store.url == "s3://my-bucket/prod"


def test_the_s3_round_trip_with_credentials_from_the_environment(
        moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDS["aws_secret_access_key"])
    store = open_store(Settings(store_url=f"s3://{BUCKET}/env", s3_endpoint=moto.endpoint,
                                s3_allow_http=True), retry=True)
    store.put_bytes("k", b"abc")
    assert store.get_bytes("k") == b"abc"
    assert moto.client().get_object(Bucket=BUCKET, Key="env/k")["Body"].read() == b"abc"


@pytest.mark.parametrize(("extra", "message"), [
    ({"s3_endpoint": "minio:9000"}, "must be an http"),  # was a Rust panic at the first call
    ({"s3_endpoint": "http://minio:9000"}, "MODELPRESS_S3_ALLOW_HTTP=true"),
    ({"s3_access_key_id": "AKID"}, "set both"),
])
def test_a_wrong_s3_setting_is_named_at_start_up(tmp_path: Path, extra: dict[str, object],
                                                 message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(Settings(data_dir=tmp_path, store_url="s3://my-bucket",
                            **extra))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="names no bucket"):
        open_store(Settings(data_dir=tmp_path, store_url="s3://"))


# ---------------------------------------------------------------- the API over a refusing store


@pytest.fixture
def api(moto: Moto, redis_server: _stack.EmbeddedRedis) -> Iterator[tuple[TestClient, Settings,
                                                                          dict[str, str]]]:
    settings = s3_settings(moto, f"s3://{BUCKET}/api",
                           redis_url=f"redis://127.0.0.1:{redis_server.port}/{fresh_db()}")
    r = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    token = create_key(r, "acme", "review")
    with TestClient(create_app(settings)) as http:
        yield http, settings, {"Authorization": f"Bearer {token}"}
    r.flushdb()
    r.close()


def npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((8, 64), np.float32), y=np.arange(8, dtype=np.int64) % 10)
    return buf.getvalue()


def test_an_upload_the_store_refuses_is_a_502_not_a_500(
        api: tuple[TestClient, Settings, dict[str, str]]) -> None:
    http, _, auth = api
    headers = {**auth, "Content-Type": "application/octet-stream"}
    with access_denied():
        r = http.post("/v1/datasets?name=d", content=npz(), headers=headers)
    assert r.status_code == 502, r.text
    assert r.json()["error"]["type"] == "store_refused"
    assert "refused the dataset" in r.json()["error"]["message"]
    assert http.get("/v1/datasets", headers=auth).json()["items"] == []  # nothing recorded
    ok = http.post("/v1/datasets?name=d", content=npz(), headers=headers)
    assert ok.status_code == 201, ok.text


def test_a_download_the_store_refuses_is_a_502_not_a_500(
        api: tuple[TestClient, Settings, dict[str, str]], tmp_path: Path) -> None:
    http, settings, auth = api
    created = http.post("/v1/jobs", headers=auth, json={
        "spec": {"kind": "benchmark", "model": {"zoo": "digits-cnn"}}})
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    # the artifact written as a worker writes it: the job started, then the object and its record
    r = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    state, attempt = r.eval(records.START, 2, records.job_key(job_id),
                            records.events_key(job_id), records.iso(),
                            records.event_json(job_id, "state", state="running"), 100)
    assert state == "running"
    ctx = WorkerContext(job_id, "acme", int(attempt), settings, r,
                        open_store(settings, retry=True), tmp_path)
    ctx.save_artifact("benchmark.json", b'{"ok": true}', "application/json")
    r.close()
    url = f"/v1/jobs/{job_id}/artifacts/benchmark.json"
    assert http.get(url, headers=auth).content == b'{"ok": true}'
    with access_denied():
        got = http.get(url, headers=auth)
    assert got.status_code == 502, got.text
    assert got.json()["error"]["type"] == "store_refused"


# ---------------------------------------------------------------- the local store


def test_the_default_store_lies_in_the_data_folder_even_with_a_space_in_its_path(
        tmp_path: Path) -> None:
    """The default store URL is `<data_dir>/store` as a file URI, which percent-encodes: the
    store went to a folder named `my%20data` beside the data folder."""
    data = tmp_path / "my data"
    store = open_store(Settings(data_dir=data))
    store.put_bytes("tenants/t/models/m/model.pt2", b"abc")
    assert (data / "store/tenants/t/models/m/model.pt2").read_bytes() == b"abc"
    assert not (tmp_path / "my%20data").exists()


def test_a_relative_file_url_is_refused_not_moved_to_the_root(tmp_path: Path) -> None:
    """`file://store/x` parses as host `store`, path `/x`: the store went to `/x`."""
    with pytest.raises(ValueError, match="three slashes"):
        open_store(Settings(data_dir=tmp_path, store_url="file://relative-folder/store"))


WRITER = """
import sys, time, obstore
from pathlib import Path
from obstore.store import LocalStore
store = LocalStore(prefix=Path(sys.argv[1]), mkdir=True, automatic_cleanup=True)
def chunks():
    yield b"x" * (1 << 20)
    print("writing", flush=True)
    time.sleep(600)
    yield b"y"
obstore.put(store, sys.argv[2], chunks())
"""


def test_deleting_a_job_removes_what_a_writer_killed_mid_write_left(tmp_path: Path) -> None:
    """A worker killed while it writes an artifact (OOM killer, the hard time limit) leaves the
    local store's staging file `<name>#<n>`. Readers never see it (good), but neither does the
    listing a delete works from: the job's delete (by hand or by retention) left it, and the
    job's folders, on disk for ever."""
    root = tmp_path / "store"
    store = open_store(Settings(data_dir=tmp_path, store_url=root.as_uri()))
    prefix = records.artifact_object("acme", "job_1", "")
    store.put_bytes(prefix + "benchmark.json", b"{}")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root), prefix + "model.onnx"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    left = [p.name for p in (root / prefix).iterdir()]
    assert "benchmark.json" in left and any(n.startswith("model.onnx#") for n in left)
    assert store.list_keys(prefix) == [prefix + "benchmark.json"]  # the staging file is unlisted

    assert asyncio.run(store.delete_prefix_async(prefix)) == 1
    assert not (root / "tenants").exists(), list(root.rglob("*"))


def test_an_upload_removes_the_temporary_files_of_uploads_a_killed_api_left(
        tmp_path: Path, redis_server: _stack.EmbeddedRedis) -> None:
    """An upload is received into `<data_dir>/tmp/upload-*` and removed when the request ends;
    an API process killed meanwhile left the file (up to the 2 GiB upload limit) for ever."""
    settings = Settings(data_dir=tmp_path, rate_limit_per_minute=0,
                        redis_url=f"redis://127.0.0.1:{redis_server.port}/{fresh_db()}")
    r = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    token = create_key(r, "acme", "review")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    stale, current = tmp / "upload-stale", tmp / "upload-current"  # a killed one, a live one
    stale.write_bytes(b"x" * 1024)
    current.write_bytes(b"x" * 1024)
    two_days_ago = time.time() - 2 * 86_400
    os.utime(stale, (two_days_ago, two_days_ago))
    try:
        with TestClient(create_app(settings)) as http:
            got = http.post("/v1/datasets?name=d", content=npz(), headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"})
        assert got.status_code == 201, got.text
        assert sorted(p.name for p in tmp.iterdir()) == ["upload-current"]
    finally:
        r.flushdb()
        r.close()


def test_a_worker_with_a_wrong_store_setting_does_not_start(tmp_path: Path) -> None:
    """Jobs would each fail on it; the worker says so at start-up instead of taking them."""
    env = {**os.environ, "MODELPRESS_REDIS_URL": "redis://127.0.0.1:6379/15",
           "MODELPRESS_DATA_DIR": str(tmp_path), "MODELPRESS_STORE_URL": "s3://b",
           "MODELPRESS_S3_ENDPOINT": "minio:9000"}
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.celery_app:celery_app", "worker",
         "-Q", "cpu", "--pool", "solo"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "MODELPRESS_S3_ENDPOINT must be an http(s) URL" in proc.stderr
