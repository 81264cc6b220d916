"""The object store (a local folder by default, S3 in production) behind one small interface.

Keys are laid out per tenant so that a key can never name another tenant's object:
``tenants/<tenant>/models/<id>/...``, ``tenants/<tenant>/jobs/<id>/artifacts/<name>``; the
built-in zoo cache lives under ``zoo/``.

Failures come out as :class:`StoreError` subclasses whose ``type`` a failed job reports. The
workers' store retries S3 calls that fail for want of an answer (connection refused, 5xx) with
backoff for ``store_retry_s`` seconds, logging each retry (so it shows in the job log); a full
disk is reported at once, as retrying cannot help. Writes are whole or absent: S3 puts are
atomic, and the local store writes a staging file that it removes on failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import obstore
from obstore.exceptions import BaseError, GenericError
from obstore.store import LocalStore, ObjectStore, S3Store

from app.config import Settings

CHUNK = 1024 * 1024
log = logging.getLogger("modelpress.store")
T = TypeVar("T")

__all__ = ["Store", "StoreError", "StoreFull", "StoreUnavailable", "StoredObject", "open_store"]


class StoreError(Exception):
    """A store call failed; ``type`` names the failure in a job's error."""

    type = "store_error"


class StoreUnavailable(StoreError):
    type = "store_unavailable"


class StoreFull(StoreError):
    type = "store_full"


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str


class Store:
    def __init__(self, inner: ObjectStore, url: str, retry_s: float = 0.0) -> None:
        self._inner = inner
        self.url = url
        self.retry_s = retry_s  # only the synchronous calls (the workers') retry

    def _may_pass(self, exc: BaseError) -> bool:
        """Whether a failed call may succeed if repeated: S3 gave no answer or a 5xx. A 4xx
        answer, another kind of obstore error or a local file system error will not change."""
        return (isinstance(exc, GenericError) and isinstance(self._inner, S3Store)
                and "Client error" not in str(exc).split("\n", 1)[0])

    def _lasting(self, exc: GenericError, what: str, key: str) -> StoreError | None:
        """The error to raise for a failure that repeating cannot mend; None when it may pass."""
        reason = str(exc).split("\n", 1)[0]
        if "os error 28" in str(exc):  # ENOSPC
            return StoreFull(f"the object store {self.url} is full: could not {what} {key}: "
                             f"{reason}")
        if not self._may_pass(exc):
            return StoreError(f"the object store {self.url} could not {what} {key}: {reason}")
        return None

    def _call(self, what: str, key: str, fn: Callable[[], T], retry: bool = True) -> T:
        start, delay, tries = time.monotonic(), 0.5, 0
        while True:
            tries += 1
            try:
                return fn()
            except GenericError as exc:
                reason = str(exc).split("\n", 1)[0]
                if (lasting := self._lasting(exc, what, key)) is not None:
                    raise lasting from None
                waited = time.monotonic() - start
                if not retry or waited + delay > self.retry_s:
                    raise StoreUnavailable(
                        f"the object store {self.url} was unavailable: could not {what} {key} "
                        f"({tries} tries over {waited:.0f} s): {reason}") from None
                log.warning("object store %s unavailable (%s); retrying %s of %s in %.1f s",
                            self.url, reason, what, key, delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)

    # ---- writes
    def put_file(self, key: str, path: Path) -> StoredObject:
        """Upload a local file (multipart for big files); the write is atomic."""
        digest = _sha256_file(path)
        self._call("write", key, lambda: obstore.put(self._inner, key, path))
        return StoredObject(key=key, size=path.stat().st_size, sha256=digest)

    def put_bytes(self, key: str, data: bytes, retry: bool = True) -> StoredObject:
        self._call("write", key, lambda: obstore.put(self._inner, key, data), retry)
        return StoredObject(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest())

    async def put_file_async(self, key: str, path: Path) -> None:
        await obstore.put_async(self._inner, key, path)

    # ---- reads
    def get_bytes(self, key: str) -> bytes:
        return self._call("read", key, lambda: bytes(obstore.get(self._inner, key).bytes()))

    def download(self, key: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")

        def fetch() -> None:  # retried whole: a dropped stream starts over
            with tmp.open("wb") as fh:
                for chunk in obstore.get(self._inner, key).stream(min_chunk_size=CHUNK):
                    fh.write(chunk)

        self._call("read", key, fetch)
        tmp.replace(dest)
        return dest

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        for chunk in obstore.get(self._inner, key).stream(min_chunk_size=CHUNK):
            yield bytes(chunk)

    async def open_stream(self, key: str) -> AsyncIterator[bytes]:
        """The object's bytes, opened now: a missing object (FileNotFoundError) or a store that
        fails (StoreError) is raised here, before an HTTP response has sent its headers."""
        try:
            result = await obstore.get_async(self._inner, key)
        except GenericError as exc:  # no retry: the client waits on this response
            reason = str(exc).split("\n", 1)[0]
            raise self._lasting(exc, "read", key) or StoreUnavailable(
                f"the object store {self.url} could not read {key}: {reason}") from None

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in result.stream(min_chunk_size=CHUNK):
                yield bytes(chunk)

        return chunks()

    async def size_async(self, key: str) -> int:
        meta = await obstore.head_async(self._inner, key)
        return int(meta["size"])

    def exists(self, key: str) -> bool:
        try:
            self._call("read", key, lambda: obstore.head(self._inner, key))
        except FileNotFoundError:
            return False
        return True

    async def exists_async(self, key: str) -> bool:
        try:
            await obstore.head_async(self._inner, key)
        except FileNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call("delete", key, lambda: obstore.delete(self._inner, key))

    async def delete_async(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await obstore.delete_async(self._inner, key)

    async def delete_prefix_async(self, prefix: str) -> int:
        """Delete every object under ``prefix`` (a folder, ending with ``/``); the count.
        Raises StoreUnavailable when the store cannot be reached (the caller keeps its records,
        so a repeated call finishes the job), StoreError when it refuses."""
        keys = []
        try:
            async for batch in obstore.list(self._inner, prefix=prefix):
                keys += [meta["path"] for meta in batch]
            for i in range(0, len(keys), 1000):
                try:
                    await obstore.delete_async(self._inner, keys[i:i + 1000])
                except FileNotFoundError:  # a local file deleted meanwhile: one at a time
                    for key in keys[i:i + 1000]:
                        await self.delete_async(key)
        except BaseError as exc:
            cls = StoreUnavailable if self._may_pass(exc) else StoreError
            raise cls(f"the object store {self.url} could not delete under {prefix}: "
                      f"{str(exc).splitlines()[0]}") from None
        return len(keys)

    def list_keys(self, prefix: str) -> list[str]:
        def fetch() -> list[str]:
            return [meta["path"] for batch in obstore.list(self._inner, prefix=prefix)
                    for meta in batch]

        return self._call("list", prefix, fetch)

    async def ping(self) -> None:
        """Readiness: a cheap list call that fails if the store is unreachable or misconfigured."""
        async for _ in obstore.list(self._inner, prefix="__readyz__", chunk_size=1):
            break


def open_store(settings: Settings, retry: bool = False) -> Store:
    """``retry``: the workers' store, whose synchronous calls retry (see the module docstring);
    otherwise (the API) obstore's own retries apply, as a request should not hang for long."""
    url = settings.resolved_store_url()
    parsed = urlparse(url)
    if parsed.scheme == "file":
        root = Path(parsed.path)
        root.mkdir(parents=True, exist_ok=True)
        # automatic_cleanup: deleting a job's or an upload's files also removes its empty folders
        return Store(LocalStore(prefix=root, mkdir=True, automatic_cleanup=True), url)
    if parsed.scheme == "s3":
        prefix = parsed.path.strip("/") or None
        secret = settings.s3_secret_access_key
        s3 = S3Store(
            parsed.netloc,
            prefix=prefix,
            endpoint=settings.s3_endpoint,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret else None,
            client_options={"allow_http": settings.s3_allow_http},
            # one retry layer, ours, so each retry is logged and the total wait is bounded
            retry_config={"max_retries": 0} if retry else None,
        )
        return Store(s3, url, settings.store_retry_s if retry else 0.0)
    raise ValueError(f"MODELPRESS_STORE_URL must start with file:// or s3://, got {url!r}")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()
