"""`docker compose config` accepts the compose file (no engine needed for that)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) where installed, else the standalone `docker-compose`."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(compose_command() is None, reason="neither docker compose nor docker-compose")
def test_compose_file_is_valid() -> None:
    cmd = compose_command()
    assert cmd is not None
    out = subprocess.run([*cmd, "-f", str(ROOT / "docker-compose.yml"), "config"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert set(cfg["services"]) >= {"api", "worker", "redis", "minio"}
    assert "--appendonly" in cfg["services"]["redis"]["command"]
    gpu = cfg["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert "gpu" in gpu["capabilities"]
    for svc in ("api", "worker"):
        env = cfg["services"][svc]["environment"]
        assert env["MODELPRESS_STORE_URL"].startswith("s3://")
        assert int(env["MODELPRESS_VISIBILITY_TIMEOUT_S"]) > int(env["MODELPRESS_TASK_TIME_LIMIT_S"])
    for df in ("api.Dockerfile", "worker-cuda.Dockerfile"):
        assert (ROOT / "docker" / df).read_text().count("torch==2.13.0") == 1
    # the worker hands its job back before Docker's SIGKILL ends the grace period
    worker = cfg["services"]["worker"]
    assert float(worker["environment"]["MODELPRESS_WORKER_STOP_GRACE_S"]) + 5 <= _seconds(
        worker["stop_grace_period"])


def _seconds(duration: str) -> float:
    """A compose duration: "60s" as written, "1m0s" as compose v2 prints it."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def test_images_run_as_a_user_with_a_home() -> None:
    """Both images run as `modelpress`, never root, and that user has a home directory: Triton
    (the worker's kernels) caches what it compiles under ~/.triton, and `useradd --system`
    alone makes none, so the first kernel call died on a PermissionError creating it."""
    for df in ("api.Dockerfile", "worker-cuda.Dockerfile"):
        text = (ROOT / "docker" / df).read_text()
        useradd = next(line for line in text.splitlines() if "useradd" in line)
        assert "--create-home" in useradd.split() or "-m" in useradd.split(), (df, useradd)
        users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
        assert users == ["modelpress"], (df, users)
