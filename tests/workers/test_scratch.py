"""Work folders of killed tasks (a forced cancel, the hard time limit) are removed by the next
task on the host; those of live processes and of other hosts are left alone."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from workers import runner


def test_the_next_task_removes_the_folders_of_dead_processes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    killed = tmp_path / f"{runner.SCRATCH_PREFIX}{gone.pid}+job_a-x1"
    live = tmp_path / f"{runner.SCRATCH_PREFIX}{os.getpid()}+job_b-x2"
    # a host whose name starts with ours ("worker" and "worker-2"), same pid namespace or not
    longer_host = tmp_path / f"{runner.SCRATCH_PREFIX[:-1]}-2+{gone.pid}+job_c-x3"
    for folder in (killed, live, longer_host):
        (folder / "tmp").mkdir(parents=True)
        (folder / "tmp" / "model.onnx").write_bytes(b"\0" * 1024)

    with runner.scratch("job_d") as work:
        assert work.parent == tmp_path and work.name.startswith(
            f"{runner.SCRATCH_PREFIX}{os.getpid()}+job_d-")
        assert not killed.exists() and live.exists() and longer_host.exists()
    assert not work.exists()  # its own cleanup, when not killed
    assert runner.sweep_scratch() == 0
