"""The object store (a local folder by default, S3 in production) behind one small interface.

Keys are laid out per tenant so that a key can never name another tenant's object:
``tenants/<tenant>/models/<id>/...``, ``tenants/<tenant>/jobs/<id>/artifacts/<name>``; the
built-in zoo cache lives under ``zoo/``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import obstore
from obstore.store import LocalStore, ObjectStore, S3Store

from app.config import Settings

CHUNK = 1024 * 1024

__all__ = ["Store", "StoredObject", "open_store"]


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str


class Store:
    def __init__(self, inner: ObjectStore, url: str) -> None:
        self._inner = inner
        self.url = url

    # ---- writes
    def put_file(self, key: str, path: Path) -> StoredObject:
        """Upload a local file (multipart for big files); the write is atomic."""
        digest = _sha256_file(path)
        obstore.put(self._inner, key, path)
        return StoredObject(key=key, size=path.stat().st_size, sha256=digest)

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        obstore.put(self._inner, key, data)
        return StoredObject(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest())

    async def put_file_async(self, key: str, path: Path) -> None:
        await obstore.put_async(self._inner, key, path)

    # ---- reads
    def get_bytes(self, key: str) -> bytes:
        return bytes(obstore.get(self._inner, key).bytes())

    def download(self, key: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        with tmp.open("wb") as fh:
            for chunk in obstore.get(self._inner, key).stream(min_chunk_size=CHUNK):
                fh.write(chunk)
        tmp.replace(dest)
        return dest

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        for chunk in obstore.get(self._inner, key).stream(min_chunk_size=CHUNK):
            yield bytes(chunk)

    async def stream(self, key: str) -> AsyncIterator[bytes]:
        result = await obstore.get_async(self._inner, key)
        async for chunk in result.stream(min_chunk_size=CHUNK):
            yield bytes(chunk)

    async def size_async(self, key: str) -> int:
        meta = await obstore.head_async(self._inner, key)
        return int(meta["size"])

    def exists(self, key: str) -> bool:
        try:
            obstore.head(self._inner, key)
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
            obstore.delete(self._inner, key)

    async def delete_async(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await obstore.delete_async(self._inner, key)

    def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        for batch in obstore.list(self._inner, prefix=prefix):
            keys.extend(meta["path"] for meta in batch)
        return keys

    async def ping(self) -> None:
        """Readiness: a cheap list call that fails if the store is unreachable or misconfigured."""
        async for _ in obstore.list(self._inner, prefix="__readyz__", chunk_size=1):
            break


def open_store(settings: Settings) -> Store:
    url = settings.resolved_store_url()
    parsed = urlparse(url)
    if parsed.scheme == "file":
        root = Path(parsed.path)
        root.mkdir(parents=True, exist_ok=True)
        return Store(LocalStore(prefix=root, mkdir=True), url)
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
        )
        return Store(s3, url)
    raise ValueError(f"MODELPRESS_STORE_URL must start with file:// or s3://, got {url!r}")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()
