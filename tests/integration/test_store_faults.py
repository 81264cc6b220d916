"""The object store failing under a job, with real processes: moto's S3 server stopped while a
job reads its input and again while it writes its artifact, S3 down for longer than the workers
retry, and a local store on a disk that is full (a real tmpfs). A job either succeeds once the
store is back, with a complete artifact, or fails with an error type that names the store and
keeps its inputs and log; never a partial artifact; each job ran once."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.schemas import BenchmarkSpec, ModelRef
from modelpress import Client, InternalServerError, NotFoundError, _stack
from tests.conftest import Stack, make_stack, running
from tests.helpers import export_tiny, measured
from tests.integration.test_service import wait_for
from tests.s3 import Moto, serving

pytestmark = pytest.mark.slow

BUCKET = "modelpress-faults"
RETRY_S = 10  # the workers' MODELPRESS_STORE_RETRY_S here


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    yield from serving(BUCKET)


@pytest.fixture(scope="module")
def s3_stack(tmp_path_factory: pytest.TempPathFactory, redis_server: _stack.EmbeddedRedis,
             moto: Moto) -> Iterator[Stack]:
    yield from running(make_stack(tmp_path_factory.mktemp("s3faults"), redis_server, moto.env(
        f"s3://{BUCKET}/prod", MODELPRESS_STORE_RETRY_S=str(RETRY_S))))


def _log_has(client: Client, job_id: str, text: str) -> bool:
    return any(text in line for line in client.jobs.log(job_id, tail=1000))


def test_s3_outages_while_reading_and_writing_are_retried_and_the_artifact_is_whole(
        s3_stack: Stack, moto: Moto, tmp_path: Path) -> None:
    with s3_stack.client() as client:
        model = client.models.upload(export_tiny(tmp_path / "tiny.pt2"), name="tiny")
        moto.stop()  # down before the worker reads the model
        job = client.jobs.create(BenchmarkSpec(model=ModelRef(id=model.id), batch_size=8,
                                               repeats=3, min_time_s=3, per_layer=False))
        wait_for(lambda: _log_has(client, job.id, "retrying list of"), 60,
                 "the worker to retry reading its input")
        moto.start()
        wait_for(lambda: client.jobs.get(job.id).progress.stage == "measure", 60,
                 "the job to be measuring")
        moto.stop()  # down again before it writes benchmark.json
        wait_for(lambda: _log_has(client, job.id, "retrying write of"), 60,
                 "the worker to retry writing its artifact")
        moto.start()
        done = client.jobs.wait(job.id, timeout=60, raise_on_failure=False)
        got = client.jobs.download(job.id, "benchmark.json", tmp_path).read_bytes()
        log = client.jobs.log(job.id, tail=1000)

    assert done.state == "succeeded", done.error
    assert done.attempts == 1 and [r.outcome for r in done.runs] == ["succeeded"]  # once
    [info] = [a for a in done.artifacts if a.name == "benchmark.json"]
    # whole: the bytes served, the bytes in S3 and the recorded size and digest agree
    s3 = moto.client()
    [key] = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="prod/")["Contents"]
             if job.id in o["Key"] and o["Key"].endswith("/benchmark.json")]
    stored = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert got == stored and len(got) == info.size
    assert hashlib.sha256(got).hexdigest() == info.sha256
    retries = [line for line in log if "unavailable" in line and "retrying" in line]
    measured.append(f"s3 outages (read, then write): {len(retries)} store retries logged; "
                    f"job succeeded in {done.attempts} attempt, artifact {info.size} bytes whole")


def test_s3_down_longer_than_the_retries_fails_the_job_clearly(
        s3_stack: Stack, moto: Moto, tmp_path: Path) -> None:
    with s3_stack.client() as client:
        model = client.models.upload(export_tiny(tmp_path / "tiny.pt2"), name="tiny")
        moto.stop()
        try:
            job = client.jobs.create(BenchmarkSpec(model=ModelRef(id=model.id), batch_size=8,
                                                   repeats=3, per_layer=False))
            t0 = time.monotonic()
            done = client.jobs.wait(job.id, timeout=RETRY_S + 60, raise_on_failure=False)
            took = time.monotonic() - t0
        finally:
            moto.start()
        log = client.jobs.log(job.id, tail=1000)
        time.sleep(2)
        again = client.jobs.get(job.id)

    assert done.state == "failed" and done.error is not None
    assert done.error.type == "store_unavailable"
    assert f"s3://{BUCKET}/prod" in done.error.message and "unavailable" in done.error.message
    assert took < RETRY_S + 45  # bounded: it gave up instead of hanging
    assert any("failed: the object store" in line for line in log)  # the log is kept
    assert again.state == "failed" and again.attempts == 1 and len(again.runs) == 1  # once
    assert again.artifacts == []
    # inputs kept; no artifact object at all
    keys = [o["Key"] for o in moto.client().list_objects_v2(
        Bucket=BUCKET, Prefix="prod/").get("Contents", [])]
    assert any(model.id in k for k in keys)
    assert not [k for k in keys if job.id in k]
    measured.append(f"s3 down > {RETRY_S} s of retries: job failed store_unavailable after "
                    f"{took:.0f} s, attempts {again.attempts}, no artifact, input kept")


def test_deleting_while_s3_is_down_keeps_the_job_and_a_repeat_finishes(
        s3_stack: Stack, moto: Moto, tmp_path: Path) -> None:
    with s3_stack.client(max_retries=0) as client:  # the 503 itself, not the SDK's retries
        model = client.models.upload(export_tiny(tmp_path / "tiny.pt2"), name="tiny")
        job = client.jobs.wait(client.jobs.create(BenchmarkSpec(
            model=ModelRef(id=model.id), batch_size=8, repeats=3, per_layer=False)).id,
            timeout=60)
        moto.stop()
        try:
            with pytest.raises(InternalServerError) as unread:  # before any header, not a cut body
                client.jobs.download(job.id, "benchmark.json", tmp_path / "got")
            t0 = time.monotonic()
            with pytest.raises(InternalServerError) as info:
                client.jobs.delete(job.id)
            took = time.monotonic() - t0
        finally:
            moto.start()
        assert unread.value.status_code == 503
        assert "could not read artifact 'benchmark.json'" in str(unread.value)
        assert not (tmp_path / "got" / "benchmark.json").exists()
        assert info.value.status_code == 503
        assert "Its record is kept; try again" in str(info.value)
        assert took < 30  # the API answers instead of hanging on the store
        assert client.jobs.get(job.id).artifacts == job.artifacts
        # An artifact whose file was removed behind the service's back: a 404 that says so.
        s3 = moto.client()
        [gone] = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="prod/")["Contents"]
                  if job.id in o["Key"] and o["Key"].endswith("/benchmark.json")]
        s3.delete_object(Bucket=BUCKET, Key=gone)
        with pytest.raises(NotFoundError, match="recorded but its file is gone"):
            client.jobs.download(job.id, "benchmark.json", tmp_path / "got")
        assert client.jobs.delete(job.id).files_removed == len(job.artifacts) - 1
        assert client.models.delete(model.id).files_removed == 1
    keys = [o["Key"] for o in moto.client().list_objects_v2(
        Bucket=BUCKET, Prefix="prod/").get("Contents", [])]
    assert not [k for k in keys if job.id in k or model.id in k]
    measured.append(f"delete with s3 down: 503 after {took:.1f} s, job kept; the repeat "
                    f"removed {len(job.artifacts) - 1} files (one deleted by hand before)")


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real file system that runs out of space (needs root, as CI has)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def disk_stack(tmp_path: Path, redis_server: _stack.EmbeddedRedis,
               full_disk: Path) -> Iterator[Stack]:
    yield from running(make_stack(tmp_path / "stack", redis_server,
                                  {"MODELPRESS_STORE_URL": full_disk.as_uri()}))


def _fill(folder: Path) -> int:
    """Write a file until the file system refuses more; returns its size."""
    written = 0
    with (folder / "filler.bin").open("wb", buffering=0) as fh:
        for block in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    written += fh.write(b"\0" * block)
    with pytest.raises(OSError) as exc:
        (folder / "probe").write_bytes(b"x" * 4096)
    assert exc.value.errno == errno.ENOSPC
    return written


def test_a_full_disk_fails_the_job_clearly_and_leaves_no_partial_file(
        disk_stack: Stack, full_disk: Path, tmp_path: Path) -> None:
    with disk_stack.client() as client:
        tiny = export_tiny(tmp_path / "tiny.pt2")
        model = client.models.upload(tiny, name="tiny")
        _fill(full_disk)
        job = client.jobs.create(BenchmarkSpec(model=ModelRef(id=model.id), batch_size=8,
                                               repeats=3, per_layer=False))
        done = client.jobs.wait(job.id, timeout=90, raise_on_failure=False)
        log = client.jobs.log(job.id, tail=1000)

    assert done.state == "failed" and done.error is not None
    assert done.error.type == "store_full"
    assert "is full" in done.error.message and full_disk.as_uri() in done.error.message
    assert done.attempts == 1 and len(done.runs) == 1
    assert any("failed: the object store" in line for line in log)  # the log is kept
    assert done.artifacts == []
    left = [p for p in (full_disk / "tenants").rglob("*") if p.is_file() and job.id in str(p)]
    assert left == []  # no partial artifact, no staging file
    [stored] = [p for p in (full_disk / "tenants").rglob("*") if p.is_file() and model.id in str(p)]
    assert stored.read_bytes() == tiny.read_bytes()  # the input is whole and kept
    measured.append(f"full disk (tmpfs, ENOSPC): job failed store_full, attempts "
                    f"{done.attempts}, 0 files left for the job, input kept")
