"""The processes `modelpress serve` (and the integration tests) start end with whoever started
them, however it ends, and no two redis-servers ever share one append-only file."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from modelpress import _stack

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="children end with their starter on Linux only")

ROOT = Path(__file__).resolve().parents[2]

# Starts an embedded redis-server and a child as serve does, writes a key, prints the pids.
STARTER = """
import sys, time
from pathlib import Path
from modelpress import _stack
import redis
folder = Path(sys.argv[1])
server = _stack.EmbeddedRedis(folder / "redis").start()
redis.Redis(port=server.port).set("written", "before the kill")
child = _stack._spawn([sys.executable, "-c", "import time; time.sleep(120)"], {}, folder / "c.log")
print(server.proc.pid, child.pid, flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # ended, not yet reaped
    except FileNotFoundError:
        return True


def test_a_killed_starter_takes_its_children_with_it(tmp_path: Path) -> None:
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path)], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        assert starter.stdout is not None
        pids = [int(p) for p in starter.stdout.readline().split()]
        assert len(pids) == 2, starter.communicate(timeout=10)
        starter.kill()  # SIGKILL, as the OOM killer or `kill -9` ends a serve: no clean-up
        starter.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(_gone(p) for p in pids):
            time.sleep(0.05)
        assert [p for p in pids if not _gone(p)] == [], "children outlived their starter"
        # The server shut down cleanly (SIGTERM: AOF written) and let go of its folder: the
        # next one starts on it, with the data.
        again = _stack.EmbeddedRedis(tmp_path / "redis").start()
        try:
            assert redis.Redis(port=again.port).get("written") == b"before the kill"
        finally:
            again.stop()
    finally:
        for pid in pids:  # only where the test failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if starter.poll() is None:
            starter.kill()
            starter.wait()


def test_a_second_redis_server_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    first = _stack.EmbeddedRedis(tmp_path).start()
    other = _stack.EmbeddedRedis(tmp_path)
    try:
        assert first.proc is not None
        with pytest.raises(RuntimeError) as info:
            other.start()
        message = str(info.value)
        assert f"pid {first.proc.pid}" in message and str(tmp_path.resolve()) in message
        assert "MODELPRESS_DATA_DIR" in message
        assert redis.Redis(port=first.port).ping()  # the first one runs on, untouched
    finally:
        other.stop()  # where it did start
        first.stop()
    second = _stack.EmbeddedRedis(tmp_path).start()  # free again once the first has stopped
    second.stop()
