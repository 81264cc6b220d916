"""The SDK and CLI against a real API and worker: ids and artifact names that are not one path
segment, download folders that cannot be made, resuming the events of a finished job, and the
async client's upload size."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.schemas import FINAL_STATES
from modelpress import (
    AsyncClient,
    BenchmarkSpec,
    InvalidArgumentError,
    Job,
    ModelRef,
    PayloadTooLargeError,
    UnprocessableEntityError,
    _stack,
)
from tests.conftest import Stack, make_stack, running
from tests.helpers import export_tiny

MAX_UPLOAD = 2**20
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: _stack.EmbeddedRedis
          ) -> Iterator[Stack]:
    # No zoo: a tiny uploaded model keeps the job to seconds.
    yield from running(make_stack(tmp_path_factory.mktemp("sdk-live"), redis_server,
                                  {"MODELPRESS_MAX_UPLOAD_BYTES": str(MAX_UPLOAD)}))


@pytest.fixture(scope="module")
def done(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Job]:
    """A key and a succeeded benchmark job of it."""
    key = stack.key()
    with stack.client(key) as c:
        model = c.models.upload(export_tiny(tmp_path_factory.mktemp("model") / "tiny.pt2"))
        job = c.jobs.create(BenchmarkSpec(model=ModelRef(id=model.id), batch_size=4, warmup=1,
                                          repeats=3, per_layer=False))
        job = c.jobs.wait(job.id, timeout=120)
    assert job.state == "succeeded", job.error
    return key, job


def _cli(stack: Stack, key: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MODELPRESS_BASE_URL": stack.base_url, "MODELPRESS_API_KEY": key,
           "PYTHONPATH": str(ROOT)}  # this checkout's CLI, run from another folder
    return subprocess.run([sys.executable, "-m", "modelpress.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_download_refuses_names_that_leave_the_folder(stack: Stack, done: tuple[str, Job],
                                                      tmp_path: Path) -> None:
    key, job = done
    dest = tmp_path / "x" / "a" / "b"
    with stack.client(key) as c:
        for name in ("../../../models", "..", ".", "", "a/b", "a\\b"):
            with pytest.raises(InvalidArgumentError, match="not a valid artifact name"):
                c.jobs.download(job.id, name, f"{dest}/")
        with pytest.raises(InvalidArgumentError, match="not a valid job id"):
            c.jobs.download("../models", "benchmark.json", f"{dest}/")
        with pytest.raises(InvalidArgumentError, match="not a valid model id"):
            c.models.get("../jobs")  # was GET /v1/jobs, read as a model: a ValidationError
        with pytest.raises(InvalidArgumentError, match="not a valid job id"):
            c.jobs.get("../models")
        with pytest.raises(InvalidArgumentError, match="not a valid dataset id"):
            c.datasets.delete("..")
        # a real one still downloads
        assert c.jobs.download(job.id, "benchmark.json", f"{dest}/").name == "benchmark.json"
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()] == [
        Path("x/a/b/benchmark.json")]

    async def via_async() -> None:
        async with AsyncClient(base_url=stack.base_url, api_key=key) as ac:
            with pytest.raises(InvalidArgumentError):
                await ac.jobs.download(job.id, "../../../models", f"{tmp_path}/y/")
            with pytest.raises(InvalidArgumentError):
                await ac.models.get("../jobs")

    asyncio.run(via_async())
    assert not (tmp_path / "y").exists() and not (tmp_path / "models").exists()


def test_cli_says_one_line_for_bad_ids_and_unwritable_folders(stack: Stack, done: tuple[str, Job],
                                                              tmp_path: Path) -> None:
    key, job = done
    (tmp_path / "a-file").write_text("")
    cases = {
        ("jobs", "get", "../models"): "not a valid job id",
        ("jobs", "download", job.id, "benchmark.json", "-o", "/proc/nonexistent/"):
            "No such file or directory",
        ("jobs", "download", job.id, "benchmark.json", "-o", "a-file/sub"): "File exists",
    }
    for args, said in cases.items():
        out = _cli(stack, key, tmp_path, *args)
        assert out.returncode == 1, (args, out.stderr)
        assert out.stderr.startswith("error: ") and said in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no .part left


def test_resuming_the_events_of_a_finished_job_ends_at_once(stack: Stack, done: tuple[str, Job]
                                                            ) -> None:
    key, job = done
    with stack.client(key) as c:
        events = list(c.jobs.events(job.id))
        assert events[-1].state in FINAL_STATES and events[-1].id
        start = time.monotonic()
        assert list(c.jobs.events(job.id, last_event_id=events[-1].id)) == []
        assert time.monotonic() - start < 10  # was ~43 s of reconnects, then an error

    async def via_async() -> list[object]:
        async with AsyncClient(base_url=stack.base_url, api_key=key) as ac:
            return [e async for e in ac.jobs.events(job.id, last_event_id=events[-1].id)]

    start = time.monotonic()
    assert asyncio.run(via_async()) == []
    assert time.monotonic() - start < 10


def test_async_upload_declares_its_size(stack: Stack, tmp_path: Path) -> None:
    big = tmp_path / "big.npz"
    big.write_bytes(b"\0" * (MAX_UPLOAD + 1))
    key = stack.key()
    said = f"upload of {MAX_UPLOAD + 1} bytes is over the limit of {MAX_UPLOAD} bytes"
    with stack.client(key) as c, pytest.raises(PayloadTooLargeError, match=said):
        c.datasets.upload(big)

    async def via_async() -> None:
        async with AsyncClient(base_url=stack.base_url, api_key=key) as ac:
            await ac.datasets.upload(big)

    with pytest.raises(PayloadTooLargeError, match=said):  # chunked, it could not say the size
        asyncio.run(via_async())


def test_uploads_are_listed_a_page_at_a_time(stack: Stack, tmp_path: Path) -> None:
    import numpy as np

    key = stack.key()  # a tenant of its own: its uploads are these
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 2), np.float32))
    with stack.client(key) as c:
        ids = [c.datasets.upload(data, name=f"d{i}").id for i in range(5)]
        first = c.datasets.page(limit=2)
        assert len(first.items) == 2 and first.next_cursor is not None
        second = c.datasets.page(limit=2, cursor=first.next_cursor)
        assert not {d.id for d in first.items} & {d.id for d in second.items}
        assert [d.id for d in c.datasets.iter()] == ids[::-1]  # newest first, each once
        assert [d.id for d in c.datasets.list(limit=3)] == ids[:1:-1]
        with pytest.raises(UnprocessableEntityError, match="cursor"):
            c.datasets.page(cursor="not-a-cursor")

    async def via_async() -> list[str]:
        async with AsyncClient(base_url=stack.base_url, api_key=key) as ac:
            return [d.id async for d in ac.datasets.iter()]

    assert asyncio.run(via_async()) == ids[::-1]
    listed = _cli(stack, key, tmp_path, "datasets", "list", "--all")
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ids[::-1], listed.stderr
    assert len(_cli(stack, key, tmp_path, "datasets", "list", "--limit", "2").stdout.splitlines()
               ) == 2


def test_ctrl_c_stops_watching_not_the_job_and_jobs_list_all(stack: Stack, done: tuple[str, Job],
                                                             tmp_path: Path) -> None:
    key, finished = done
    assert isinstance(finished.spec, BenchmarkSpec)
    with stack.client(key) as c:  # the gpu queue: no worker here serves it, so it stays queued
        job = c.jobs.create(finished.spec.model_copy(update={"device": "cuda"}))
    env = {**os.environ, "MODELPRESS_BASE_URL": stack.base_url, "MODELPRESS_API_KEY": key,
           "PYTHONPATH": str(ROOT)}
    watch = subprocess.Popen([sys.executable, "-m", "modelpress.cli", "jobs", "watch", job.id],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert watch.stderr is not None
        watch.stderr.read(1)  # the progress display has started: the CLI is in wait()
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=30)
    finally:
        watch.kill()
    assert watch.returncode == 130, err
    assert f"stopped watching; job {job.id} goes on" in err and "Traceback" not in err, err
    with stack.client(key) as c:
        assert c.jobs.get(job.id).state == "queued"
        listed = _cli(stack, key, tmp_path, "jobs", "list", "--all")
        assert [line.split()[0] for line in listed.stdout.splitlines()] == [job.id, finished.id]
        c.jobs.cancel(job.id)
