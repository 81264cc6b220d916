"""The object store (a local folder by default, S3 in production) behind one small interface.

Keys are laid out per tenant so that a key can never name another tenant's object:
``tenants/<tenant>/models/<id>/...``, ``tenants/<tenant>/jobs/<id>/artifacts/<name>``; the
built-in zoo cache lives under ``zoo/``.

Failures come out as :class:`StoreError` subclasses whose ``type`` a failed job reports. The
workers' store retries S3 calls that fail for want of an answer (connection refused, 5xx, 408,
429) with backoff for ``store_retry_s`` seconds, logging each retry (so it shows in the job log);
a refusal (another 4xx: a wrong key, a missing permission or bucket) and a full disk are
reported at once, as retrying cannot help. Writes are whole or absent: S3 puts are atomic, and
the local store writes a staging file that it removes on failure; one that a process killed
mid-write leaves is never listed, so never read, and a prefix delete removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

import obstore
from obstore.exceptions import BaseError, GenericError
from obstore.store import LocalStore, ObjectStore, S3Store

from app.config import Settings

CHUNK = 1024 * 1024
_STATUS = re.compile(r"(?:non-2xx status code:|Client error with status) (\d{3})")
_STAGING = re.compile(r"#\d+$")  # obstore's local staging file: "<name>#<n>"
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
        answer (but 408 and 429), another kind of obstore error or a local file system error
        will not change. obstore words a 4xx as "Client error" or, for a list call's (a wrong
        bucket's 404, a 403), "Server returned non-2xx status code: 403 Forbidden"."""
        if not (isinstance(exc, GenericError) and isinstance(self._inner, S3Store)):
            return False
        first = str(exc).split("\n", 1)[0]
        status = _STATUS.search(first)
        if status is not None:
            code = int(status.group(1))
            return not 400 <= code < 500 or code in (408, 429)
        return "Client error" not in first

    def _lasting(self, exc: BaseError, what: str, key: str) -> StoreError | None:
        """The error to raise for a failure that repeating cannot mend; None when it may pass.
        Not only GenericError: S3 answering 401 or 403 (a wrong key, a missing permission) comes
        as obstore's UnauthenticatedError or PermissionDeniedError."""
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
            except BaseError as exc:
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
        self._write(key, lambda: obstore.put(self._inner, key, path))
        return StoredObject(key=key, size=path.stat().st_size, sha256=digest)

    def put_bytes(self, key: str, data: bytes, retry: bool = True) -> StoredObject:
        self._write(key, lambda: obstore.put(self._inner, key, data), retry)
        return StoredObject(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest())

    def _write(self, key: str, fn: Callable[[], object], retry: bool = True) -> None:
        try:
            self._call("write", key, fn, retry)
        except FileNotFoundError as exc:  # S3's 404 to a put: the bucket is not there
            raise self._no_bucket(exc, key) from None

    def _no_bucket(self, exc: FileNotFoundError, key: str) -> StoreError:
        reason = str(exc).split("\n", 1)[0]
        hint = " (does the bucket exist?)" if isinstance(self._inner, S3Store) else ""
        return StoreError(f"the object store {self.url} could not write {key}: {reason}{hint}")

    async def put_file_async(self, key: str, path: Path) -> None:
        """As :meth:`put_file`, for the API (no retries of ours): StoreError when it fails."""
        try:
            await obstore.put_async(self._inner, key, path)
        except FileNotFoundError as exc:
            raise self._no_bucket(exc, key) from None
        except BaseError as exc:
            reason = str(exc).split("\n", 1)[0]
            raise self._lasting(exc, "write", key) or StoreUnavailable(
                f"the object store {self.url} could not write {key}: {reason}") from None

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
        except BaseError as exc:  # no retry: the client waits on this response
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
        if isinstance(self._inner, LocalStore):
            try:
                await asyncio.to_thread(self._remove_staging, prefix)
            except OSError as exc:  # the objects are gone; leftovers are only disk space
                log.warning("could not remove staging files under %s: %s", prefix, exc)
        return len(keys)

    def _remove_staging(self, prefix: str) -> None:
        """The local store's staging files under ``prefix`` (``<name>#<n>``), which a process
        killed mid-write leaves behind; obstore's list never shows them, so without this a
        deleted job or upload would keep them, and its folder, for ever. Then the empty folders."""
        folder = self._local_root() / prefix
        if not folder.is_dir():
            return
        for path in sorted(folder.rglob("*"), reverse=True):  # children before their folders
            if path.is_file() and _STAGING.search(path.name):
                path.unlink(missing_ok=True)
            elif path.is_dir():
                with contextlib.suppress(OSError):  # not empty: an object written meanwhile
                    path.rmdir()
        root = self._local_root()
        with contextlib.suppress(OSError):  # and the emptied parents, as automatic_cleanup does
            while folder != root and root in folder.parents:
                folder.rmdir()
                folder = folder.parent

    def _local_root(self) -> Path:
        return Path(unquote(urlparse(self.url).path))

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
        if parsed.netloc not in ("", "localhost"):  # file://data/store: "data" is a host name
            raise ValueError(f"MODELPRESS_STORE_URL {url!r} names a host; a local store is "
                             "file:///an/absolute/path (three slashes)")
        # as_uri() (the default store's URL) percent-encodes: "my data" -> "my%20data"
        root = Path(unquote(parsed.path))
        root.mkdir(parents=True, exist_ok=True)
        # automatic_cleanup: deleting a job's or an upload's files also removes its empty folders
        return Store(LocalStore(prefix=root, mkdir=True, automatic_cleanup=True), url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"MODELPRESS_STORE_URL {url!r} names no bucket: s3://bucket[/prefix]")
        prefix = parsed.path.strip("/") or None
        # Only what is set: obstore refuses None, and an unset key or endpoint means its own
        # default (AWS's endpoint; credentials from AWS_* variables or the instance's role).
        config: dict[str, str] = {"region": settings.s3_region}
        if settings.s3_endpoint:
            config["endpoint"] = _checked_endpoint(settings.s3_endpoint, settings.s3_allow_http)
        secret = settings.s3_secret_access_key
        if bool(settings.s3_access_key_id) != bool(secret):
            raise ValueError("set both MODELPRESS_S3_ACCESS_KEY_ID and "
                             "MODELPRESS_S3_SECRET_ACCESS_KEY, or neither (then the AWS_* "
                             "variables or the instance's role give the credentials)")
        if settings.s3_access_key_id and secret:
            config["access_key_id"] = settings.s3_access_key_id
            config["secret_access_key"] = secret.get_secret_value()
        s3 = S3Store(
            parsed.netloc,
            prefix=prefix,
            config=config,  # type: ignore[arg-type]  # S3Config's keys, built up above
            client_options={"allow_http": settings.s3_allow_http},
            # one retry layer, ours, so each retry is logged and the total wait is bounded
            retry_config={"max_retries": 0} if retry else None,
        )
        return Store(s3, url, settings.store_retry_s if retry else 0.0)
    raise ValueError(f"MODELPRESS_STORE_URL must start with file:// or s3://, got {url!r}")


def _checked_endpoint(endpoint: str, allow_http: bool) -> str:
    """MODELPRESS_S3_ENDPOINT, checked at start-up: obstore takes any string and fails at the
    first call (one without a scheme, such as ``minio:9000``, with a Rust panic)."""
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"MODELPRESS_S3_ENDPOINT must be an http(s) URL such as "
                         f"https://s3.example.com or http://minio:9000, got {endpoint!r}")
    if parsed.scheme == "http" and not allow_http:
        raise ValueError(f"MODELPRESS_S3_ENDPOINT {endpoint!r} is plain http: set "
                         "MODELPRESS_S3_ALLOW_HTTP=true to use it, or use https")
    return endpoint


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()
