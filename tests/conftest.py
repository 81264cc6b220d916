"""Shared fixtures: a real redis-server, and real API + Celery worker processes around it.

Nothing here is mocked: the stack is the same one `modelpress serve` starts, on free ports, with
its data under a temporary folder. Each test gets a fresh tenant (API key), so tests sharing a
stack cannot see each other's jobs.
"""

from __future__ import annotations

import os

import torch

# Triton kernels run on the CPU through Triton's interpreter where there is no GPU. Set before
# anything imports triton (kernel modules are imported lazily, inside tests).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from app.auth import create_key
from app.config import Settings
from app.storage import open_store
from modelpress import Client, _stack
from tests.helpers import measured
from workers.engine import zoo

# Short limits so the crash test's redelivery happens in seconds, not hours. The visibility
# timeout still exceeds the time limit, as the settings validator requires.
# Databases of the session's redis-server (and of any a test starts for make_stack, which
# numbers its stacks from the same counter): one per stack and per tests/app test.
DATABASES = 512

FAST_LIMITS = {
    "MODELPRESS_TASK_TIME_LIMIT_S": "60",
    "MODELPRESS_VISIBILITY_TIMEOUT_S": "61",
    "MODELPRESS_WORKER_HEARTBEAT_S": "1",
}


def _needs_zoo(item: pytest.Item) -> bool:
    return "shared_store" in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture scope
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Modules whose tests need the zoo run after the others (each module kept whole and in
    # order), so the zoo trains in the background while the others run (see _zoo_training).
    late = {getattr(item, "module", None) for item in items if _needs_zoo(item)}
    items.sort(key=lambda item: getattr(item, "module", None) in late)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if measured:
        terminalreporter.write_sep("-", "measured")
        for line in measured:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_stack.EmbeddedRedis]:
    """Our own redis-server on a free port (never the machine's shared one)."""
    server = _stack.EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False,
                                  databases=DATABASES).start()
    yield server
    server.stop()


@dataclass
class ZooTraining:
    root: Path
    procs: list[tuple[subprocess.Popen[bytes], Path]]  # and their logs

    def stop(self) -> None:
        """Kill the trainers still running (the session ended, or failed, before they did)."""
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


ROOT = Path(__file__).resolve().parents[1]
ZOO_TRAINING_LIMIT_S = 900  # about 150 s on two idle cores


def _start_zoo_training(tmp_path_factory: pytest.TempPathFactory) -> ZooTraining:
    root = tmp_path_factory.mktemp("store")
    logs = tmp_path_factory.mktemp("zoo-logs")
    procs = []
    for names in ("teacher", "digits-cnn,char-gpt"):  # about the same time each
        log = logs / f"{names.replace(',', '+')}.log"
        with log.open("wb") as out:
            # a session of its own: see _zoo_train on autogroup
            procs.append((subprocess.Popen(
                [sys.executable, "-m", "tests._zoo_train", str(os.getpid()), str(root), names],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True), log))
    return ZooTraining(root, procs)


@pytest.fixture(scope="session", autouse=True)
def _zoo_training(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[ZooTraining | None]:
    """Start training the zoo (one thread: digits-cnn ~14 s, char-gpt ~70 s, the digits
    diffusion teacher ~150 s) at the session's start, in two processes at the lowest priority,
    where the session has a test that needs it. They use the CPU the first modules leave idle
    (those wait on processes and sockets much of the time); ``shared_store`` waits for them."""
    training = (_start_zoo_training(tmp_path_factory)
                if any(_needs_zoo(item) for item in request.session.items) else None)
    yield training
    if training is not None:
        training.stop()


@pytest.fixture(scope="session")
def shared_store(_zoo_training: ZooTraining | None, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Path]:
    """One local object store for the session, with the zoo models that train on first use
    trained into it once, so jobs with short time limits do not pay for training."""
    # Not started at the session's start where no collected test names this fixture (one that
    # asks for it at run time, through request.getfixturevalue): start it now.
    training = _zoo_training or _start_zoo_training(tmp_path_factory)
    t0 = time.monotonic()
    try:
        for proc, log in training.procs:
            try:
                rc = proc.wait(timeout=ZOO_TRAINING_LIMIT_S)
            except subprocess.TimeoutExpired:
                rc = None
            if rc != 0:
                pytest.fail(f"training the zoo failed (exit {rc}, limit {ZOO_TRAINING_LIMIT_S} s):\n"
                            f"{log.read_text(errors='replace')[-4000:]}")
        # This process may have trained its own copies (tests with their own store): use the
        # store's, which the workers load, so in-process results and the workers' agree to the bit.
        zoo._memory_cache.clear()
        from workers.engine.diffusion.teacher import teacher

        store = open_store(Settings(store_url=training.root.as_uri()))
        zoo.digits_cnn(store)
        zoo.char_gpt(store)
        teacher(store)
        measured.append(f"zoo: the first test that needs it waited {time.monotonic() - t0:.0f} s "
                        "for its background training")
        yield training.root
    finally:
        training.stop()


@dataclass
class Stack:
    """A running API and worker set against one Redis, with a helper to add processes."""

    root: Path
    env: dict[str, str]
    db: int
    base_url: str = ""
    api: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    access_log: bool = False  # uvicorn's request lines, as the API image logs them

    @property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.env["MODELPRESS_REDIS_URL"], decode_responses=True)

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def start_api(self) -> None:
        port = _stack.free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.api = _stack.spawn_api(self.env, self.log("api"), "127.0.0.1", port, self.access_log)

    def start_worker(self, name: str = "w1") -> subprocess.Popen[bytes]:
        proc = _stack.spawn_worker(self.env, self.log(name), ["cpu"], name)
        self.workers.append(proc)
        return proc

    def wait_ready(self) -> None:
        procs = {"api": self.api} if self.api else {}
        _stack.wait_ready(self.base_url, 90.0, {k: v for k, v in procs.items() if v},
                          {"api": self.log("api")})

    def key(self, tenant: str | None = None) -> str:
        return create_key(self.redis, tenant or f"t{uuid.uuid4().hex[:12]}", "test")

    def client(self, key: str | None = None, **kw: object) -> Client:
        return Client(base_url=self.base_url, api_key=key or self.key(), **kw)  # type: ignore[arg-type]

    def stop(self) -> None:
        _stack.stop_process(self.api)
        for w in self.workers:
            _stack.stop_process(w, timeout=5)

    def dump_logs(self) -> str:
        out = []
        for p in sorted((self.root / "logs").glob("*.log")):
            out.append(f"==== {p.name}\n{p.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)


_db_counter = iter(range(1, DATABASES))  # the session's redis-server's (tests/app: one a test)


def fresh_db() -> int:
    """A database of the session's redis-server that no other test or stack uses."""
    return next(_db_counter)


def make_stack(root: Path, redis_server: _stack.EmbeddedRedis, extra_env: dict[str, str]) -> Stack:
    db = fresh_db()  # a Redis database per stack: no shared queue between stacks
    env = {
        "MODELPRESS_REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/{db}",
        "MODELPRESS_DATA_DIR": str(root),
        "MODELPRESS_RATE_LIMIT_PER_MINUTE": "0",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        **FAST_LIMITS,
        **extra_env,
    }
    return Stack(root=root, env=env, db=db)


def running(s: Stack, workers: tuple[str, ...] = ("w1",)) -> Iterator[Stack]:
    """Start the API and the workers, wait until ready, and stop them afterwards."""
    s.start_api()
    for name in workers:
        s.start_worker(name)
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()
        if os.environ.get("MODELPRESS_TEST_LOGS"):
            print(s.dump_logs())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: _stack.EmbeddedRedis,
          shared_store: Path) -> Iterator[Stack]:
    """API + one worker, shared by the tests of a module."""
    yield from running(make_stack(tmp_path_factory.mktemp("stack"), redis_server,
                                  {"MODELPRESS_STORE_URL": shared_store.as_uri(),
                                   "MODELPRESS_MAX_UPLOAD_BYTES": str(32 * 2**20)}))
