"""The README's first command, minus the install: `modelpress serve --demo --exit` with no Redis
configured starts an embedded redis-server, a worker and the API, runs the main job through the
SDK and prints its result."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_serve_demo_on_embedded_redis(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MODELPRESS_") and k != "REDIS_URL"}
    env["MODELPRESS_API_PORT"] = "0"  # 0 is never free to bind: serve picks a free port itself
    proc = subprocess.run([sys.executable, "-m", "modelpress.cli", "serve", "--demo", "--exit"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "embedded redis-server" in out
    assert re.search(r"dashboard http://127\.0\.0\.1:\d+/", out)
    key = (tmp_path / ".modelpress" / "api-key").read_text().strip()
    assert key.startswith("mp_") and key in out
    assert (tmp_path / ".modelpress" / "api-key").stat().st_mode & 0o077 == 0
    assert not (tmp_path / ".modelpress" / "redis-url").exists()  # written while serving only
    assert not (tmp_path / ".modelpress" / "url").exists()  # no SDK call goes to a dead address
    assert re.search(r"job job_\w+ succeeded — mixed_precision of digits-cnn", out), out
    assert re.search(r"chosen\s+accuracy 0\.\d+, \d+\.\d+ ms", out), out
    # Everything it started has stopped: the API and the embedded Redis no longer answer.
    api = re.search(r"api\s+(http://127\.0\.0\.1:\d+)", out)
    redis_port = re.search(r"redis://127\.0\.0\.1:(\d+)", out)
    assert api and redis_port
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{api.group(1)}/healthz", timeout=2)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(redis_port.group(1)))) != 0
