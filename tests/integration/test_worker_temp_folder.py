"""A worker whose temp folder cannot take the job's work folder (full, or gone) fails the job
with what to fix; the job used to stay 'running' forever (its delivery acknowledged)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.schemas import BenchmarkSpec, ModelRef
from modelpress import _stack
from tests.conftest import Stack, make_stack, running


@pytest.fixture
def tmp_stack(tmp_path: Path, redis_server: _stack.EmbeddedRedis) -> Iterator[Stack]:
    (tmp_path / "tmp").mkdir()
    yield from running(make_stack(tmp_path / "stack", redis_server,
                                  {"TMPDIR": str(tmp_path / "tmp")}))


def test_a_job_the_worker_has_no_work_folder_for_fails_and_says_why(
        tmp_stack: Stack, tmp_path: Path) -> None:
    s = tmp_stack
    # The worker chose its temp folder at start; now nothing can be created in it.
    shutil.rmtree(tmp_path / "tmp")
    (tmp_path / "tmp").write_text("not a folder")
    with s.client() as client:
        job = client.jobs.create(BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), repeats=1,
                                               per_layer=False))
        done = client.jobs.wait(job.id, timeout=30, raise_on_failure=False)
        log = client.jobs.log(job.id)
    assert done.state == "failed" and done.error is not None, done.state
    assert done.error.type == "worker_error"
    assert str(tmp_path / "tmp") in done.error.message and "TMPDIR" in done.error.message
    assert [(r.attempt, r.outcome) for r in done.runs] == [(1, "failed")]
    assert any("could not create the job's work folder" in line for line in log)
