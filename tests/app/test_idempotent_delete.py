"""DELETE with an Idempotency-Key, at the module level against a real Redis and a local store:
a retry that overlaps a slow try, a Lua script the Redis client re-sends after a lost reply, and
a key sent for two targets. (The SDK's retry after a lost HTTP reply, through the real API, is in
tests/integration/test_service.py.)"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from app import assets, jobs, pending, records
from app.config import Settings
from app.deps import Services
from app.errors import ApiError
from app.schemas import BenchmarkSpec, DatasetRef, Deleted, JobCreate, ModelRef
from app.storage import StoreUnavailable
from tests.app.conftest import TENANT, run, upload


def files(settings: Settings) -> list[Path]:
    root = Path(settings.store_url.removeprefix("file://"))
    return [p for p in root.rglob("*") if p.is_file()]


def hold_first_try(svc: Services, first_fails: bool) -> tuple[asyncio.Event, asyncio.Event]:
    """The store's delete for try A (the first) waits until ``release`` is set, then fails if
    ``first_fails`` (else it deletes); every later try's does the opposite at once. Returns
    (A is waiting, release)."""
    inner, a_waiting, release = svc.store.delete_prefix_async, asyncio.Event(), asyncio.Event()

    async def held(prefix: str) -> int:
        fails = first_fails
        if not a_waiting.is_set():  # try A
            a_waiting.set()
            await release.wait()
        else:
            fails = not first_fails
        if fails:
            raise StoreUnavailable("no answer")
        return await inner(prefix)

    svc.store.delete_prefix_async = held  # type: ignore[method-assign]
    return a_waiting, release


def test_a_retry_that_overlaps_a_slow_try_finishes_it_once(settings: Settings) -> None:
    """Try A takes the record, then hangs on the store; the client gives up and retries with the
    same key (B), which finishes the delete. A's store call then fails: A must not put the record
    back (the upload would come back without its file)."""

    async def body(svc: Services) -> tuple[Deleted, str, Any]:
        dataset = await upload(svc)
        a_waiting, release = hold_first_try(svc, first_fails=True)
        a = asyncio.create_task(assets.delete_asset(svc, "datasets", TENANT, dataset, "key-00001"))
        await a_waiting.wait()
        b = await assets.delete_asset(svc, "datasets", TENANT, dataset, "key-00001")
        release.set()
        with pytest.raises(ApiError) as a_error:
            await a
        assert a_error.value.status == 503
        again = await assets.delete_asset(svc, "datasets", TENANT, dataset, "key-00001")
        assert again == b
        return b, dataset, await svc.redis.get(records.asset_key("datasets", dataset))

    answer, dataset, record = run(settings, body)
    assert answer == Deleted(id=dataset, object="dataset", files_removed=1)
    assert record is None and files(settings) == []  # not put back by A


def test_a_script_re_sent_after_a_lost_reply_is_answered(settings: Settings) -> None:
    """redis-py re-sends a command whose reply was lost: the second run of the script that took
    the record (or deleted the job) finds nothing. With a key, the request still answers what
    the first run did, instead of a 404."""

    async def body(svc: Services) -> tuple[Deleted, Deleted, str, str]:
        dataset = await upload(svc)
        job = "job_" + "3" * 32
        await svc.redis.hset(records.job_key(job), mapping={"state": "succeeded",
                                                            "tenant": TENANT})
        svc.store.put_bytes(records.artifact_object(TENANT, job, "a.json"), b"{}")
        inner = svc.redis.eval

        async def twice(script: str, numkeys: int, *args: Any) -> Any:
            result = await inner(script, numkeys, *args)  # type: ignore[misc]
            if script in (records.TAKE_UPLOAD, records.DELETE_JOB):
                return await inner(script, numkeys, *args)  # type: ignore[misc]
            return result

        svc.redis.eval = twice  # type: ignore[method-assign]
        up = await assets.delete_asset(svc, "datasets", TENANT, dataset, "key-00002")
        # without a key the request gets a key of its own: the same resolution
        keyless = await upload(svc)
        assert (await assets.delete_asset(svc, "datasets", TENANT, keyless)).files_removed == 1
        done = await jobs.delete_job(svc, TENANT, job, "key-00003")
        for call in (assets.delete_asset(svc, "datasets", TENANT, dataset),  # no key: a 404
                     jobs.delete_job(svc, TENANT, job)):
            with pytest.raises(ApiError) as missing:
                await call
            assert missing.value.status == 404
        return up, done, dataset, job

    up, done, dataset, job = run(settings, body)
    assert up == Deleted(id=dataset, object="dataset", files_removed=1)
    assert done == Deleted(id=job, object="job", files_removed=1)
    assert files(settings) == []


def test_one_key_names_one_target(settings: Settings) -> None:
    async def body(svc: Services) -> tuple[str, str | None]:
        first, second = await upload(svc), await upload(svc)
        await assets.delete_asset(svc, "datasets", TENANT, first, "key-00004")
        with pytest.raises(ApiError) as reused:
            await assets.delete_asset(svc, "datasets", TENANT, second, "key-00004")
        assert reused.value.status == 422
        with pytest.raises(ApiError) as for_a_job:
            await jobs.delete_job(svc, TENANT, "job_" + "4" * 32, "key-00004")
        assert for_a_job.value.status == 422
        return second, await svc.redis.get(records.asset_key("datasets", second))

    second, record = run(settings, body)
    assert record is not None and json.loads(record)["id"] == second  # untouched
    assert [p.parent.name for p in files(settings)] == [second]


def test_a_retry_that_fails_cannot_bring_back_an_upload_whose_files_are_gone(
        settings: Settings) -> None:
    """The other order: the retry (B) claims the delete and fails (the store refuses it), putting
    the record back; then the slow first try (A) removes the file. A ends the delete: the record
    goes too, since it would name no file."""

    async def body(svc: Services) -> tuple[Deleted, str, Any]:
        dataset = await upload(svc)
        a_waiting, release = hold_first_try(svc, first_fails=False)
        a = asyncio.create_task(assets.delete_asset(svc, "datasets", TENANT, dataset, "key-00005"))
        await a_waiting.wait()
        with pytest.raises(ApiError) as b_error:
            await assets.delete_asset(svc, "datasets", TENANT, dataset, "key-00005")
        assert b_error.value.status == 503
        assert await svc.redis.get(records.asset_key("datasets", dataset))  # B put it back
        release.set()
        return await a, dataset, await svc.redis.get(records.asset_key("datasets", dataset))

    answer, dataset, record = run(settings, body)
    assert answer == Deleted(id=dataset, object="dataset", files_removed=1)
    assert record is None and files(settings) == []


def test_the_api_finishes_a_delete_nobody_repeated(settings: Settings) -> None:
    """An API process died right after taking two uploads' records (no request repeats them):
    the resolver deletes the one no job needs and puts back the one a running job names."""

    async def body(svc: Services) -> tuple[int, int, Any, Any, list[str], list[str]]:
        free, used = await upload(svc), await upload(svc)
        job = "job_" + "5" * 32
        await svc.redis.hset(records.job_key(job), mapping={
            "tenant": TENANT, "state": "running",
            "spec": json.dumps({"kind": "benchmark", "dataset": {"id": used}})})
        await svc.redis.zadd(records.tenant_jobs_key(TENANT), {job: 1})
        for dataset in (free, used):
            await svc.redis.eval(
                records.TAKE_UPLOAD, 4, records.asset_key("datasets", dataset),
                records.tenant_assets_key(TENANT, "datasets"),
                records.delete_replay_key(TENANT, f"internal.{dataset}"),
                records.PENDING_DELETES_KEY, dataset, f"dataset {dataset}", "dead-api",
                time.time() - 700)
        fresh = await upload(svc)  # taken a moment ago: a live request is still on it
        await svc.redis.eval(
            records.TAKE_UPLOAD, 4, records.asset_key("datasets", fresh),
            records.tenant_assets_key(TENANT, "datasets"),
            records.delete_replay_key(TENANT, "internal.fresh"), records.PENDING_DELETES_KEY,
            fresh, f"dataset {fresh}", "live-api", time.time())
        ended = await pending.resolve(svc)
        again = await pending.resolve(svc)
        left = await svc.redis.zrange(records.PENDING_DELETES_KEY, 0, -1)
        return (ended, again, await svc.redis.get(records.asset_key("datasets", free)),
                await svc.redis.get(records.asset_key("datasets", used)), left, [used, fresh])

    ended, again, free_record, used_record, left, kept = run(settings, body)
    assert (ended, again) == (2, 0)
    assert free_record is None and used_record is not None
    assert left == [records.delete_replay_key(TENANT, "internal.fresh")]
    assert sorted(p.parent.name for p in files(settings)) == sorted(kept)


def test_a_job_cannot_name_an_upload_deleted_while_it_is_created(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The delete takes the record between the create's check and its write: the write fails
    (the record was watched from the check on) and the create answers 404, instead of a queued
    job whose input is gone."""
    checks = []
    check = jobs._check_refs

    async def body(svc: Services) -> tuple[int, list[str]]:
        dataset = await upload(svc)

        async def check_then_a_delete(svc_: Services, tenant: str, spec: Any) -> None:
            await check(svc_, tenant, spec)
            checks.append(1)
            if len(checks) == 2:  # the check inside the write's watch
                await assets.delete_asset(svc, "datasets", TENANT, dataset)

        monkeypatch.setattr(jobs, "_check_refs", check_then_a_delete)
        spec = BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), dataset=DatasetRef(id=dataset))
        with pytest.raises(ApiError) as refused:
            await jobs.create_job(svc, TENANT, JobCreate(spec=spec))
        return refused.value.status, await svc.redis.zrange(records.tenant_jobs_key(TENANT), 0, -1)

    status, listed = run(settings, body)
    assert status == 404 and listed == [] and len(checks) == 2
