"""What the engine may ask of the job that runs it: progress, cancellation, logging, artifacts,
inputs, a memo of finished evaluations (so a re-run after a crash resumes) and fan-out: other
workers may compute independent pieces of the same job (claims make sure each is computed once)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from app.schemas import ArtifactInfo
from app.storage import Store, StoreError


class JobCancelled(Exception):
    """Raised at the engine's next check after a user cancelled the job."""


class UserError(Exception):
    """A failure the user can fix (bad input, incompatible model); its message is shown as is."""

    type = "invalid_input"


def _not_the_inputs() -> tuple[type[BaseException], ...]:
    """Exceptions that say nothing about the user's model or data, whatever they interrupt: a
    cancel, the store, and the worker's soft time limit (Celery's; absent when the engine runs
    as a plain library without it)."""
    import torch  # here: needed only once an exception is being classified

    # the machine's limits, not the inputs: memory (torch's OOM is a RuntimeError subclass)
    kinds: list[type[BaseException]] = [UserError, JobCancelled, StoreError, MemoryError,
                                        torch.OutOfMemoryError]
    try:
        from celery.exceptions import SoftTimeLimitExceeded
    except ImportError:  # pragma: no cover - the worker always has celery
        pass
    else:
        kinds.append(SoftTimeLimitExceeded)
    return tuple(kinds)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def input_advice(exc: BaseException, exported_for: Any = None) -> str:
    """What to fix, read from the error of a model run on the user's inputs (``exported_for``:
    the input shapes a .pt2 was exported with, when known)."""
    text = str(exc)
    seen = f" for inputs {exported_for}" if exported_for is not None else ""
    guard = re.search(r"Guard failed: \w+\.size\(\)\[(\d+)\]", text)
    if guard and guard.group(1) == "0":
        return (f"; the program was exported for a fixed batch{seen}: export it with "
                "torch.export.Dim for the batch dimension to run other batch sizes")
    if guard or ("shape" in text.lower() and exported_for is not None):
        return (f"; the program was exported{seen}: give inputs of those shapes (or export "
                "with torch.export.Dim for each dimension that varies)")
    if ("same dtype" in text or "scalar type" in text or "Input type" in text
            or "dtype" in text.lower()):
        return ("; the inputs' dtype is not the model's: float32 arrays for a float model, "
                "int64 token ids for an embedding layer")
    if "index out of range" in text or "out of bounds" in text:
        return "; an input id is at or past the end of a table (a token id >= the vocabulary size?)"
    return ""


@contextmanager
def inputs_at_fault(what: str, advice: str | None = None,
                    exported_for: Any = None) -> Iterator[None]:
    """A failure inside is the user's model or data failing (``what``, then the error's first
    line and ``advice``, by default read from the error): a failed job the user can act on, not
    a traceback. A cancel, the time limit or the store still fail the job as themselves."""
    try:
        yield
    except _not_the_inputs():
        raise
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # a full disk is not theirs
            raise
        tail = input_advice(exc, exported_for) if advice is None else advice
        raise UserError(f"{what} ({first_line(exc)}){tail}") from None


class JobContext(Protocol):
    job_id: str
    attempt: int  # this run of the job (a worker that died mid-job starts the next)
    who: str  # the worker process, as memoized values name who computed them
    log: logging.Logger

    @property
    def store(self) -> Store | None: ...

    @property
    def tenant(self) -> str: ...

    @property
    def workdir(self) -> Path: ...

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        """Report progress; raises :class:`JobCancelled` if the job was cancelled."""

    def check_cancelled(self) -> None:
        """Raise :class:`JobCancelled` if the job was cancelled."""

    def save_artifact(self, name: str, data: bytes | Path, media_type: str) -> ArtifactInfo: ...

    def memo_get(self, key: str) -> Any | None: ...

    def memo_put(self, key: str, value: Any) -> None: ...

    def claim(self, key: str) -> AbstractContextManager[bool]:
        """While held (True), no other process of this job computes ``key``; False: another
        one holds it now."""

    def fan_out(self, items: list[dict[str, Any]]) -> int:
        """Offer ``items`` (independent pieces of this job) to other workers; how many were
        sent (0 where there is nobody to send them to)."""


def compute_once(ctx: JobContext, key: str, compute: Callable[[], dict[str, Any]],
                 wait: bool = True, poll_s: float = 0.5) -> dict[str, Any] | None:
    """The memoized value of ``key``: from the memo, computed here under a claim, or (``wait``)
    awaited while another worker computes it. A worker that dies drops its claim (it expires),
    and the piece is computed by whoever asks next, so nothing is lost or done twice."""
    while True:
        hit = ctx.memo_get(key)
        if hit is not None:
            return _as_dict(hit)
        with ctx.claim(key) as mine:
            if mine:
                hit = ctx.memo_get(key)  # finished between our read and our claim
                if hit is not None:
                    return _as_dict(hit)
                value = {**compute(), "by": ctx.who}
                ctx.memo_put(key, value)
                return value
        if not wait:
            return None
        ctx.check_cancelled()
        time.sleep(poll_s)


def _as_dict(hit: Any) -> dict[str, Any]:
    """A memoized value; a bare number is one written before values named their worker (a job
    retried across an upgrade), kept under ``v``."""
    return dict(hit) if isinstance(hit, dict) else {"v": hit, "by": "earlier"}


def memo_key(*parts: Any) -> str:
    """A stable key for an evaluation from its JSON-able description."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class LocalContext:
    """A job context for library use and tests: artifacts go to a folder, progress to a list."""

    def __init__(
        self,
        workdir: Path,
        store: Store | None = None,
        tenant: str = "local",
        job_id: str = "local",
        cancel_after: int | None = None,
    ) -> None:
        self.job_id = job_id
        self.attempt = 1
        self.who = "local"
        self._tenant = tenant
        self._store = store
        self._workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = logging.getLogger(f"modelpress.job.{job_id}")
        self.events: list[tuple[str, float, str]] = []
        self.artifacts: dict[str, ArtifactInfo] = {}
        self._memo: dict[str, Any] = {}
        self._cancel_after = cancel_after

    @property
    def store(self) -> Store | None:
        return self._store

    @property
    def tenant(self) -> str:
        return self._tenant

    @property
    def workdir(self) -> Path:
        return self._workdir

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        self.events.append((stage, fraction, message))
        self.check_cancelled()

    def check_cancelled(self) -> None:
        if self._cancel_after is not None and len(self.events) >= self._cancel_after:
            raise JobCancelled()

    def save_artifact(self, name: str, data: bytes | Path, media_type: str) -> ArtifactInfo:
        dest = self._workdir / "artifacts" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        raw = data.read_bytes() if isinstance(data, Path) else data
        dest.write_bytes(raw)
        from app.records import now

        info = ArtifactInfo(name=name, size=len(raw), sha256=hashlib.sha256(raw).hexdigest(),
                            media_type=media_type, created_at=now())
        self.artifacts[name] = info
        return info

    def memo_get(self, key: str) -> Any | None:
        return self._memo.get(key)

    def memo_put(self, key: str, value: Any) -> None:
        self._memo[key] = value

    @contextmanager
    def claim(self, key: str) -> Iterator[bool]:
        yield True  # one process: nobody to share with

    def fan_out(self, items: list[dict[str, Any]]) -> int:
        return 0


class Throttle:
    """Lets a call through at most every ``period`` seconds (progress bursts cost Redis writes)."""

    def __init__(self, period: float) -> None:
        self._period = period
        self._last = 0.0

    def ready(self) -> bool:
        t = time.monotonic()
        if t - self._last >= self._period:
            self._last = t
            return True
        return False
