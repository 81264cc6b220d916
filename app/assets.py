"""Uploaded models and datasets: received as a stream, checked without executing anything,
stored in the object store and indexed per tenant in Redis."""

from __future__ import annotations

import hashlib
import json
import logging
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
from app.schemas import FINAL_STATES, DatasetFormat, DatasetInfo, Deleted, ModelFormat, ModelInfo
from app.storage import StoreError, StoreFull, StoreUnavailable

log = logging.getLogger("modelpress.api")
Collection = Literal["models", "datasets"]
ACCEPTED_TYPES = {"application/octet-stream", "application/zip", "application/x-zip-compressed"}
NAME_RE = re.compile(r"[\w][\w .@+-]{0,127}")  # fullmatch: "$" would let a final "\n" in
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
    await anyio.to_thread.run_sync(sweep_stale_uploads, tmp_dir)
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


STALE_UPLOAD_S = 86_400  # no upload is received, checked and stored for this long


def sweep_stale_uploads(tmp_dir: Path) -> int:
    """Removes the temporary files of uploads that an API process killed mid-request (a
    restart, the OOM killer) never removed, up to ``max_upload_bytes`` each; how many. Only old
    ones: another API process sharing the data folder may be receiving one now."""
    removed, cutoff = 0, time.time() - STALE_UPLOAD_S
    for path in tmp_dir.glob("upload-*"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:  # removed by another process meanwhile
            continue
    if removed:
        log.info("removed %d temporary upload file(s) left by an interrupted request", removed)
    return removed


def _check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ApiError(422, "name must be 1-128 letters, digits, spaces or . _ - @ +")
    return name


def _check_sha(expected: str | None, actual: str) -> None:
    if expected and expected.lower() != actual:
        raise ApiError(400, f"checksum mismatch: body sha256 is {actual}, header said {expected}",
                       "checksum_mismatch")


def upload_id(collection: Collection, tenant: str, key: str | None) -> str:
    """A new upload's id; with an Idempotency-Key, one derived from it, so every try of one
    upload (a retry after a timeout or a lost reply) names the same upload instead of a copy."""
    prefix = "mdl" if collection == "models" else "dst"
    if key is None:
        return f"{prefix}_{uuid.uuid4().hex}"
    return f"{prefix}_{hashlib.sha256(f'{tenant}:{collection}:{key}'.encode()).hexdigest()[:32]}"


async def _earlier_upload(svc: Services, collection: Collection, tenant: str, key: str,
                          asset_id: str, digest: str, model: type[T]) -> T | None:
    """What an earlier try with this Idempotency-Key stored, if it got that far. The key holds
    the body's sha256 (24 h; the record's after that), so another body is a 422 and cannot
    overwrite the file; once a try has recorded the upload it says so, so a late retry of an
    upload deleted since is a 409 instead of bringing it back."""
    claim = records.upload_claim_key(tenant, collection, key)
    held, recorded = digest, False
    if not await svc.redis.set(claim, digest, nx=True, ex=records.IDEMPOTENCY_TTL_S):
        held, _, mark = (await svc.redis.get(claim) or digest).partition(" ")
        recorded = mark == RECORDED
    raw = await svc.redis.get(records.asset_key(collection, asset_id))
    data = json.loads(raw) if raw is not None else None
    if data is not None:
        held = data["sha256"]
    if held != digest:
        raise ApiError(422, f"this Idempotency-Key was sent with another file (sha256 {held}, this "
                            f"one {digest}); send a new key with each upload")
    if data is None and recorded:
        raise ApiError(409, f"the upload this Idempotency-Key made ({asset_id}) has been deleted "
                            "(or is being deleted); to upload the file again, send a new key",
                       "upload_deleted")
    if data is None:
        return None
    data.pop("tenant")  # the id is derived from the tenant too
    return model.model_validate(data)


RECORDED = "recorded"  # the upload claim's mark once a try has recorded the upload


async def _recorded(svc: Services, collection: Collection, tenant: str, info: T,
                    idempotency_key: str | None = None) -> tuple[T, bool]:
    """``info`` recorded and indexed in one step, or what a concurrent try with the same
    Idempotency-Key (so the same id and file) recorded first: (info, created)."""
    asset_id = info.model_dump()["id"]
    data = {"tenant": tenant, **info.model_dump(mode="json")}
    pipe = svc.redis.pipeline(transaction=True)
    pipe.set(records.asset_key(collection, asset_id), json.dumps(data), nx=True)
    pipe.zadd(records.tenant_assets_key(tenant, collection), {asset_id: time.time()}, nx=True)
    if idempotency_key is not None:
        pipe.set(records.upload_claim_key(tenant, collection, idempotency_key),
                 f"{data['sha256']} {RECORDED}", xx=True, keepttl=True)
    created = (await pipe.execute())[0]
    if created:
        return info, True
    return await get_asset(svc, collection, tenant, asset_id, type(info)), False


async def create_model(
    svc: Services, tenant: str, request: Request, name: str, fmt: ModelFormat | None,
    sha256: str | None, idempotency_key: str | None = None,
) -> tuple[ModelInfo, bool]:
    """The recorded upload and whether it was made now (False: an earlier try with the same
    Idempotency-Key made it)."""
    _check_name(name)
    path, size, digest = await receive_upload(request, svc)
    model_id = upload_id("models", tenant, idempotency_key)
    try:
        _check_sha(sha256, digest)
        if idempotency_key is not None:
            earlier = await _earlier_upload(svc, "models", tenant, idempotency_key, model_id,
                                            digest, ModelInfo)
            if earlier is not None:
                return earlier, False
        limit = svc.settings.max_unpacked_bytes
        try:
            kind, details = await anyio.to_thread.run_sync(filechecks.check_model, path, fmt, limit)
        except filechecks.Rejected as exc:
            raise ApiError(422, str(exc), "invalid_model") from None
        await store_upload(svc, records.model_object(tenant, model_id, kind), path, "model")
        info = ModelInfo(id=model_id, name=name, format=kind, size=size, sha256=digest,
                         created_at=records.now(), details=details)
        return await _recorded(svc, "models", tenant, info, idempotency_key)
    finally:
        path.unlink(missing_ok=True)


async def create_dataset(
    svc: Services, tenant: str, request: Request, name: str, fmt: DatasetFormat | None,
    sha256: str | None, idempotency_key: str | None = None,
) -> tuple[DatasetInfo, bool]:
    """As :func:`create_model`."""
    _check_name(name)
    path, size, digest = await receive_upload(request, svc)
    dataset_id = upload_id("datasets", tenant, idempotency_key)
    try:
        _check_sha(sha256, digest)
        if idempotency_key is not None:
            earlier = await _earlier_upload(svc, "datasets", tenant, idempotency_key, dataset_id,
                                            digest, DatasetInfo)
            if earlier is not None:
                return earlier, False
        limit = svc.settings.max_unpacked_bytes
        try:
            kind, tensors = await anyio.to_thread.run_sync(filechecks.check_dataset, path, fmt,
                                                           limit)
        except filechecks.Rejected as exc:
            raise ApiError(422, str(exc), "invalid_dataset") from None
        await store_upload(svc, records.dataset_object(tenant, dataset_id, kind), path, "dataset")
        info = DatasetInfo(id=dataset_id, name=name, format=kind, size=size, sha256=digest,
                           created_at=records.now(), tensors=tensors)
        return await _recorded(svc, "datasets", tenant, info, idempotency_key)
    finally:
        path.unlink(missing_ok=True)


async def store_upload(svc: Services, key: str, path: Path, what: str) -> None:
    """The checked upload into the object store; a store that fails is a 503 (no answer, or a
    5xx: the upload can be sent again later), 507 (full) or 502 (it refused), never a 500."""
    try:
        await svc.store.put_file_async(key, path)
    except StoreUnavailable as exc:
        raise ApiError(503, f"could not store the {what}: {exc}; nothing was recorded, send it "
                            "again when the object store answers") from None
    except StoreFull as exc:
        raise ApiError(507, f"could not store the {what}: {exc}", "store_full") from None
    except StoreError as exc:
        raise ApiError(502, f"the object store refused the {what}: {exc}. Nothing was recorded; "
                            "check the store's settings and permissions (the service needs to "
                            "write objects)", "store_refused") from None


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


async def require_asset(svc: Services, collection: Collection, tenant: str, asset_id: str
                        ) -> ModelInfo | DatasetInfo:
    """The upload's record; a 404 unless the caller owns it (a job naming it, a delete taking
    it)."""
    return await get_asset(svc, collection, tenant, asset_id,
                           ModelInfo if collection == "models" else DatasetInfo)


async def list_assets(svc: Services, collection: Collection, tenant: str, model: type[T],
                      limit: int, cursor: str | None = None) -> tuple[list[T], str | None]:
    """The newest ``limit`` uploads after ``cursor``, newest first, and the cursor of the next
    page (None on the last). The index is scored by upload time; a cursor names the last entry
    read (score and id: Redis orders one score's entries by id, descending), so uploads of the
    same instant are neither skipped nor shown twice."""
    index = records.tenant_assets_key(tenant, collection)
    top, after = ("+inf", None) if cursor is None else cursor.split(":", 1)
    shown = None if after is None else float(top)
    out: list[T] = []
    last: tuple[float, str] | None = None
    offset = 0
    while True:
        batch: list[tuple[str, float]] = await svc.redis.zrevrangebyscore(
            index, top, "-inf", start=offset, num=limit + 1, withscores=True)
        offset += len(batch)
        # entries on an earlier page: those of the cursor's score down to its id
        fresh = [(i, sc) for i, sc in batch
                 if not (after is not None and sc == shown and i >= after)]
        while fresh:
            take, fresh = fresh[: limit - len(out)], fresh[limit - len(out):]
            if not take:  # a full page and one more entry: there is a next page
                assert last is not None
                return out, f"{last[0]!r}:{last[1]}"
            last = (take[-1][1], take[-1][0])
            raws = await svc.redis.mget([records.asset_key(collection, i) for i, _ in take])
            for raw in raws:
                if raw is not None:  # (deleted between index and read)
                    data = json.loads(raw)
                    data.pop("tenant")
                    out.append(model.model_validate(data))
        if len(batch) < limit + 1:
            return out, None


INTERNAL_REPLAY_TTL_S = 60  # the replay of a DELETE sent without a key: only its own retries


def delete_key(idempotency_key: str | None) -> tuple[str, int]:
    """The key a DELETE's replay is kept under, and for how long: a request without one gets a
    key of its own (kept briefly), so a script the Redis client re-sends after a lost reply, or
    a crash after the record was taken, is resolved the same way."""
    if idempotency_key:
        return idempotency_key, records.IDEMPOTENCY_TTL_S
    return f"internal.{uuid.uuid4().hex}", INTERNAL_REPLAY_TTL_S  # '.': no client key has one


async def delete_asset(svc: Services, collection: Collection, tenant: str, asset_id: str,
                       idempotency_key: str | None = None) -> Deleted:
    """An upload's file and record, unless a queued or running job still needs it (jobs that
    finished keep their results; a re-run of one would report the input missing).

    The record goes first, so a job submitted from then on is refused (404) instead of failing
    later for a missing file; it comes back if the upload turns out to be in use (409) or its
    file cannot be deleted (5xx), so a repeated DELETE can finish the work. Meanwhile it waits in
    the key's replay, indexed as pending: a retry with the key, or the API's resolver
    (``app.pending``) for a delete nobody retries, finishes or undoes it."""
    what = collection[:-1]
    target = f"{what} {asset_id}"
    key, index = records.asset_key(collection, asset_id), records.tenant_assets_key(tenant, collection)
    replay_id, ttl = delete_key(idempotency_key)
    replay, owner = records.delete_replay_key(tenant, replay_id), uuid.uuid4().hex
    keys = (key, index, replay, records.PENDING_DELETES_KEY)
    for _ in range(3):
        earlier = await claim_delete_replay(svc, replay, target, owner)
        if earlier is not None and "answer" in earlier:
            return Deleted.model_validate(earlier["answer"])
        if earlier is not None:  # a try with this key took the record and did not finish
            raw, score = earlier["pending"], earlier["score"]
            break
        await require_asset(svc, collection, tenant, asset_id)
        taken = await svc.redis.eval(records.TAKE_UPLOAD, 4, *keys, asset_id, target, owner,
                                     time.time())
        if taken is not None:
            raw, score = taken
            break
        # gone meanwhile: deleted by a concurrent call (then a 404 next), or taken by a try with
        # this key (this very script, perhaps, re-sent by the Redis client after a lost reply)
    else:
        raise not_found(what, asset_id)
    try:
        users = await _active_jobs_using(svc, tenant, asset_id)
        if users:
            listed = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
            raise ApiError(409, f"{what} {asset_id} is an input of {len(users)} queued or running "
                                f"job(s): {listed}; cancel them or let them finish, then delete it")
        removed = await delete_files(svc, f"tenants/{tenant}/{collection}/{asset_id}/", target)
    except BaseException:
        await _put_back(svc, keys, asset_id, raw, score, owner, target)
        raise
    answer = Deleted(id=asset_id, object="model" if collection == "models" else "dataset",
                     files_removed=removed)
    try:
        first = await svc.redis.eval(records.FINISH_UPLOAD, 4, *keys, asset_id,
                                     replay_json(target, answer), ttl)
        return Deleted.model_validate(json.loads(first)["answer"])
    except Exception:  # the files are gone; the pending replay lets a retry or the resolver end it
        log.exception("could not record the end of the delete of %s", target)
        return answer


async def _put_back(svc: Services, keys: tuple[str, ...], asset_id: str, raw: str, score: str,
                    owner: str, target: str) -> None:
    """The record a refused or failed delete took, unless another try with the same key has
    claimed or finished the delete since."""
    try:
        await svc.redis.eval(records.RESTORE_UPLOAD, 4, *keys, asset_id, raw,
                             score or str(time.time()), owner)
    except Exception as exc:
        log.exception("could not restore the record of %s: %s", target, raw)
        raise ApiError(503, f"could not put back the record of {target} after the delete "
                            f"stopped ({exc}); it waits as a pending delete, which a repeat with "
                            "the same Idempotency-Key, or the service within minutes, finishes "
                            "or undoes") from None


async def claim_delete_replay(svc: Services, replay: str, target: str, owner: str
                              ) -> dict[str, Any] | None:
    """What an earlier DELETE sent with the same Idempotency-Key left, if any; a pending upload
    delete of this target is now ``owner``'s to finish."""
    return _check_target(await svc.redis.eval(records.CLAIM_REPLAY, 1, replay, target, owner),
                         target)


async def read_delete_replay(svc: Services, replay: str, target: str) -> dict[str, Any] | None:
    """What an earlier DELETE sent with the same Idempotency-Key left, if any."""
    return _check_target(await svc.redis.get(replay), target)


def _check_target(raw: str | None, target: str) -> dict[str, Any] | None:
    """A replay as a dict; a key names one target, so reusing it for another is a 422."""
    if raw is None:
        return None
    data: dict[str, Any] = json.loads(raw)
    if data["target"] != target:
        raise ApiError(422, f"this Idempotency-Key was used to delete {data['target']}; send a new "
                            "key with each delete")
    return data


def replay_json(target: str, answer: Deleted) -> str:
    return json.dumps({"target": target, "answer": answer.model_dump(mode="json")})


async def delete_files(svc: Services, prefix: str, what: str) -> int:
    """Every stored object under ``prefix``; a store that does not answer is a 503 that keeps
    the caller's records, so a repeated DELETE finishes the work."""
    try:
        return await svc.store.delete_prefix_async(prefix)
    except StoreUnavailable as exc:
        raise ApiError(503, f"could not delete the files of {what}: {exc}. Its record is kept; "
                            "try again when the object store answers") from None
    except StoreError as exc:
        raise ApiError(502, f"the object store refused to delete the files of {what}: {exc}. "
                            "Its record is kept; check the store's permissions (the service "
                            "needs to list and delete objects)", "store_refused") from None


async def _active_jobs_using(svc: Services, tenant: str, asset_id: str) -> list[str]:
    """The tenant's queued or running jobs whose spec names ``asset_id`` (oldest first). Every
    job enters FINISHED_KEY when it ends, so one server-side set difference leaves the jobs that
    may be live; their states (a job can end meanwhile) and the live ones' specs are read."""
    ids: list[str] = await svc.redis.zdiff([records.tenant_jobs_key(tenant), records.FINISHED_KEY])
    users = []
    for i in range(0, len(ids), 1000):
        batch = ids[i:i + 1000]
        pipe = svc.redis.pipeline(transaction=False)
        for job_id in batch:
            pipe.hget(records.job_key(job_id), "state")
        live = [j for j, st in zip(batch, await pipe.execute(), strict=True)
                if st is not None and st not in FINAL_STATES]
        if not live:
            continue
        pipe = svc.redis.pipeline(transaction=False)
        for job_id in live:
            pipe.hget(records.job_key(job_id), "spec")
        for job_id, spec in zip(live, await pipe.execute(), strict=True):
            if spec and _names(json.loads(spec), asset_id):
                users.append(job_id)
    return users


def _names(value: Any, asset_id: str) -> bool:
    """Whether a spec (as JSON) holds a reference ``{"id": asset_id, ...}`` anywhere."""
    if isinstance(value, dict):
        return value.get("id") == asset_id or any(_names(v, asset_id) for v in value.values())
    if isinstance(value, list):
        return any(_names(v, asset_id) for v in value)
    return False
