"""What an operator meets running the service: /readyz against a real Redis, and `modelpress
serve` as a real process refusing bad settings in one line and stopping everything it started
when it is stopped itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from app import records
from app.config import Settings
from app.deps import Services
from app.redis_client import async_client
from app.routes.health import readyz
from app.storage import open_store
from modelpress import _stack
from tests.conftest import fresh_db
from workers.heartbeat import announce

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def redis_url(redis_server: _stack.EmbeddedRedis) -> Iterator[str]:
    url = f"redis://127.0.0.1:{redis_server.port}/{fresh_db()}"
    yield url
    redis.Redis.from_url(url).flushdb()


def _ready(settings: Settings) -> tuple[int, dict[str, str]]:
    async def main() -> tuple[int, dict[str, str]]:
        svc = Services(settings, async_client(settings), open_store(settings),
                       celery=None)  # type: ignore[arg-type]  # readyz enqueues nothing
        try:
            response = await readyz(svc)
            checks: dict[str, str] = json.loads(bytes(response.body))["checks"]
            return response.status_code, checks
        finally:
            await svc.redis.aclose()

    return asyncio.run(main())


def test_readyz_wants_a_worker_on_the_default_queue(redis_url: str, tmp_path: Path) -> None:
    """A live worker that consumes only `gpu` runs none of the default (`cpu`) jobs: not ready."""
    settings = Settings(redis_url=redis_url, store_url=(tmp_path / "store").as_uri())
    r = redis.Redis.from_url(redis_url)
    assert _ready(settings)[0] == 503  # no worker at all
    announce(r, "g@h", json.dumps({"hostname": "g@h", "queues": ["gpu"]}), 60)
    status, checks = _ready(settings)
    assert status == 503, checks
    assert checks["worker"] == "no worker consumes the default queue `cpu` (1 alive; queues gpu)"
    gpu_default = Settings(redis_url=redis_url, store_url=(tmp_path / "store").as_uri(),
                           default_queue="gpu")
    assert _ready(gpu_default) == (200, {"redis": "ok", "worker": "ok (1 alive; queues gpu)",
                                         "store": "ok"})
    announce(r, "c@h", json.dumps({"hostname": "c@h", "queues": ["cpu"]}), 60)
    assert _ready(settings)[1]["worker"] == "ok (2 alive; queues cpu, gpu)"


def _serve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MODELPRESS_") and k != "REDIS_URL"}
    env.update({"MODELPRESS_DATA_DIR": str(tmp_path / "data"), "MODELPRESS_API_PORT": "0",
                **extra})
    return env


def _serve(tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modelpress.cli", "serve"], cwd=tmp_path,
                          env=_serve_env(tmp_path, **extra), capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(("extra", "says"), [
    ({"MODELPRESS_STORE_URL": "s3://bucket", "MODELPRESS_S3_ENDPOINT": "http://127.0.0.1:9"},
     "Error: invalid store setting: MODELPRESS_S3_ENDPOINT 'http://127.0.0.1:9' is plain http"),
    ({"MODELPRESS_API_PORT": "70000"},
     "MODELPRESS_API_PORT: Input should be less than or equal to 65535"),
    ({"MODELPRESS_WORKER_QUEUES": "gpu"},
     "the worker would consume gpu but jobs go to the default queue `cpu`"),
])
def test_serve_refuses_a_bad_setting_in_one_line_before_starting_anything(
        tmp_path: Path, extra: dict[str, str], says: str) -> None:
    """Before: a store setting the worker refuses came back as serve's own traceback around
    the worker's log; a port over 65535 as an OverflowError; a worker without the default queue
    as two minutes of waiting for a /readyz that could not pass."""
    try:
        proc = _serve(tmp_path, **extra)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "data" / "redis").exists()  # no embedded Redis was started
    finally:
        _kill_left(tmp_path / "data")


def _left_running(data_dir: Path) -> list[int]:
    """Processes started for ``data_dir``: the worker and the API carry it in their
    environment; the embedded redis-server works in a folder under it (it overwrites its own
    command line and environment with its title)."""
    mine = str(data_dir)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if (f"MODELPRESS_DATA_DIR={mine}".encode() in environ
                or cwd == mine or cwd.startswith(mine + "/")):
            found.append(int(entry.name))
    return found


def _kill_left(data_dir: Path) -> None:
    """Only what this test's serve started."""
    for pid in _left_running(data_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_serve_stopped_while_starting_stops_what_it_started(tmp_path: Path,
                                                            sig: signal.Signals) -> None:
    """Before: SIGTERM (a service manager) or SIGHUP (a closed terminal) before the service
    was ready ended serve alone; the embedded redis-server and the worker, each in a session of
    its own, ran on."""
    data_dir = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-m", "modelpress.cli", "serve"], cwd=tmp_path,
                            env=_serve_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        out = ""
        while "embedded redis-server" not in out:
            line = proc.stdout.readline()
            assert line, out
            out += line
        time.sleep(0.5)  # the worker and the API are being started; /readyz is seconds away
        proc.send_signal(sig)
        out += proc.communicate(timeout=60)[0]
        assert "api key" not in out, "ready before the signal: this test needs a slower start"
        assert proc.returncode == 0, out
        assert "stopping (a running job gets up to" in out, out  # said as for Ctrl-C
        assert _left_running(data_dir) == [], out
        assert not (data_dir / "redis-url").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_left(data_dir)


def test_api_port_must_be_a_port() -> None:
    for bad in (-1, 65536):
        with pytest.raises(ValidationError, match="api_port"):
            Settings(api_port=bad)
    assert Settings(api_port=0).api_port == 0  # serve picks a free one


def test_worker_queues_option_is_stripped_like_the_setting(redis_url: str, tmp_path: Path) -> None:
    """`modelpress worker --queues "cpu, gpu"` consumes `gpu`, not ` gpu` (a queue no job is
    sent to), as MODELPRESS_WORKER_QUEUES="cpu, gpu" does; the worker's heartbeat says which.
    SIGTERM is remapped to Celery's cold shutdown."""
    env = _serve_env(tmp_path, MODELPRESS_REDIS_URL=redis_url,
                     MODELPRESS_STORE_URL=(tmp_path / "store").as_uri(),
                     MODELPRESS_WORKER_HEARTBEAT_S="1")
    proc = subprocess.Popen([sys.executable, "-m", "modelpress.cli", "worker", "--queues",
                             "cpu, gpu", "--name", "strip"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        deadline = time.monotonic() + 90
        keys: list[str] = []
        while not keys and time.monotonic() < deadline and proc.poll() is None:
            keys = r.keys(records.WORKER_PATTERN)
            time.sleep(0.2)
        assert keys, f"no worker heartbeat (exit code {proc.poll()})"
        assert json.loads(r.get(keys[0]) or "{}")["queues"] == ["cpu", "gpu"]
        # the CLI exec'd Celery (same pid) with SIGTERM as the cold shutdown that hands a
        # running job back (tests/integration/test_worker_stop.py)
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        assert b"REMAP_SIGTERM=SIGQUIT" in environ
    finally:
        _stack.stop_process(proc)  # its own process group: the worker and its pool


def test_serve_in_process_gives_back_the_signal_handlers(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """serve takes SIGTERM and SIGHUP while it runs and ignores signals while it stops its
    processes; run inside another program (here a CliRunner), it leaves them as it found them."""
    from click.testing import CliRunner

    from modelpress.cli import main

    monkeypatch.chdir(tmp_path)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    result = CliRunner().invoke(main, ["serve", "--exit"], env={
        "MODELPRESS_REDIS_URL": f"redis://127.0.0.1:{_stack.free_port()}/0",
        "MODELPRESS_DATA_DIR": str(tmp_path / "data")})
    assert result.exit_code == 1 and "could not reach Redis" in result.output, result.output
    assert {sig: signal.getsignal(sig) for sig in before} == before
