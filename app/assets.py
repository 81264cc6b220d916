"""Uploaded models and datasets: received as a stream, checked without executing anything,
stored in the object store and indexed per tenant in Redis."""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel

from app import filechecks, records
from app.deps import Services
from app.errors import ApiError, not_found
from app.schemas import DatasetFormat, DatasetInfo, ModelFormat, ModelInfo

Collection = Literal["models", "datasets"]
ACCEPTED_TYPES = {"application/octet-stream", "application/zip", "application/x-zip-compressed"}
NAME_RE = re.compile(r"^[\w][\w .@+-]{0,127}$")
T = TypeVar("T", bound=BaseModel)


async def receive_upload(request: Request, svc: Services) -> tuple[Path, int, str]:
    """Stream the raw request body to a temporary file, enforcing the size limit as it arrives."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ACCEPTED_TYPES:
        raise ApiError(415, f"send the file as the raw body with Content-Type "
                            f"application/octet-stream (got {ctype or 'none'!r})")
    limit = svc.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"upload of {declared} bytes is over the limit of {limit} bytes")
    tmp_dir = svc.settings.data_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    path = tmp_dir / f"upload-{uuid.uuid4().hex}"
    digest = hashlib.sha256()
    size = 0
    try:
        async with await anyio.open_file(path, "wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"upload is over the limit of {limit} bytes")
                digest.update(chunk)
                await fh.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if size == 0:
        path.unlink(missing_ok=True)
        raise ApiError(400, "the upload is empty: send the file as the request body")
    return path, size, digest.hexdigest()


def _check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ApiError(422, "name must be 1-128 letters, digits, spaces or . _ - @ +")
    return name


def _check_sha(expected: str | None, actual: str) -> None:
    if expected and expected.lower() != actual:
        raise ApiError(400, f"checksum mismatch: body sha256 is {actual}, header said {expected}",
                       "checksum_mismatch")


async def _index(svc: Services, collection: Collection, tenant: str,
                 info: ModelInfo | DatasetInfo) -> None:
    asset_id = info.id
    data = {"tenant": tenant, **info.model_dump(mode="json")}
    pipe = svc.redis.pipeline(transaction=True)
    pipe.set(records.asset_key(collection, asset_id), json.dumps(data))
    pipe.zadd(records.tenant_assets_key(tenant, collection), {asset_id: time.time()})
    await pipe.execute()


async def create_model(
    svc: Services, tenant: str, request: Request, name: str, fmt: ModelFormat | None,
    sha256: str | None,
) -> ModelInfo:
    _check_name(name)
    path, size, digest = await receive_upload(request, svc)
    try:
        _check_sha(sha256, digest)
        limit = svc.settings.max_unpacked_bytes
        try:
            if fmt is not None:
                kind: ModelFormat = fmt
            else:
                kind = await anyio.to_thread.run_sync(filechecks.detect_model_format, path)
            check = filechecks.check_pt2 if kind == "pt2" else filechecks.check_hf_zip
            details: dict[str, Any] = await anyio.to_thread.run_sync(check, path, limit)
        except filechecks.Rejected as exc:
            raise ApiError(422, str(exc), "invalid_model") from None
        model_id = f"mdl_{uuid.uuid4().hex}"
        await svc.store.put_file_async(records.model_object(tenant, model_id, kind), path)
        info = ModelInfo(id=model_id, name=name, format=kind, size=size, sha256=digest,
                         created_at=records.now(), details=details)
        await _index(svc, "models", tenant, info)
        return info
    finally:
        path.unlink(missing_ok=True)


async def create_dataset(
    svc: Services, tenant: str, request: Request, name: str, fmt: DatasetFormat | None,
    sha256: str | None
) -> DatasetInfo:
    _check_name(name)
    path, size, digest = await receive_upload(request, svc)
    try:
        _check_sha(sha256, digest)
        if fmt is None:
            fmt = filechecks.detect_dataset_format(path)
        try:
            if fmt == "npz":
                tensors = await anyio.to_thread.run_sync(
                    filechecks.check_npz, path, svc.settings.max_unpacked_bytes
                )
            else:
                tensors = await anyio.to_thread.run_sync(filechecks.check_safetensors, path)
        except filechecks.Rejected as exc:
            raise ApiError(422, str(exc), "invalid_dataset") from None
        dataset_id = f"dst_{uuid.uuid4().hex}"
        await svc.store.put_file_async(records.dataset_object(tenant, dataset_id, fmt), path)
        info = DatasetInfo(id=dataset_id, name=name, format=fmt, size=size, sha256=digest,
                           created_at=records.now(), tensors=tensors)
        await _index(svc, "datasets", tenant, info)
        return info
    finally:
        path.unlink(missing_ok=True)


async def get_asset(svc: Services, collection: Collection, tenant: str, asset_id: str,
                    model: type[T]) -> T:
    raw = await svc.redis.get(records.asset_key(collection, asset_id))
    if raw is None:
        raise not_found(collection[:-1], asset_id)
    data = json.loads(raw)
    # Another tenant's asset is indistinguishable from a missing one.
    if data.pop("tenant") != tenant:
        raise not_found(collection[:-1], asset_id)
    return model.model_validate(data)


async def list_assets(svc: Services, collection: Collection, tenant: str, model: type[T],
                      limit: int) -> list[T]:
    ids = await svc.redis.zrevrange(records.tenant_assets_key(tenant, collection), 0, limit - 1)
    if not ids:
        return []
    raws = await svc.redis.mget([records.asset_key(collection, i) for i in ids])
    out: list[T] = []
    for raw in raws:
        if raw is not None:
            data = json.loads(raw)
            data.pop("tenant")
            out.append(model.model_validate(data))
    return out
