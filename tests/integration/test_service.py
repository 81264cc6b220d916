"""End to end through real processes: the API (uvicorn), a Celery worker, redis-server, the store.

Submit -> SSE progress -> result -> artifact; cancel; tenancy; bad input; idempotency; paging.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from app import jobs, records
from app.config import Settings
from app.deps import Services
from app.redis_client import async_client
from app.schemas import (
    BenchmarkResult,
    BenchmarkSpec,
    DatasetRef,
    Deleted,
    LossBenchmarkSpec,
    ModelRef,
    RunAttempt,
)
from app.storage import Store, open_store
from modelpress import (
    APIConnectionError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConflictError,
    IntegrityError,
    Job,
    JobFailedError,
    NotFoundError,
    PayloadTooLargeError,
    UnprocessableEntityError,
    _stack,
)
from tests.conftest import Stack, fresh_db
from tests.helpers import export_tiny, hostile_pickle, pt2_with_pickled_weights, tiny_hf_folder
from workers import runner
from workers.engine.context import JobCancelled
from workers.runner import WorkerContext

pytestmark = pytest.mark.slow


def sse_events(stack: Stack, key: str, job_id: str) -> list[dict[str, Any]]:
    """Read the raw SSE stream until the server ends it (after the final state)."""
    events: list[dict[str, Any]] = []
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    with httpx.stream("GET", f"{stack.base_url}/v1/jobs/{job_id}/events", headers=headers,
                      timeout=httpx.Timeout(10.0, read=120.0)) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        current: dict[str, str] = {}
        for line in resp.iter_lines():
            if line.startswith(("event:", "id:", "data:")):
                field, _, value = line.partition(":")
                current[field] = value.strip()
            elif line == "" and "data" in current:
                events.append({"event": current.get("event"), "id": current.get("id"),
                               **json.loads(current["data"])})
                current = {}
    return events


def stored_object(store: Path, job_id: str, name: str) -> Path:
    [path] = [p for p in store.rglob(name) if job_id in p.parts]
    return path


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_submit_progress_result_artifact(stack: Stack, shared_store: Path) -> None:
    key = stack.key()
    with stack.client(key) as client:
        job = client.jobs.create(BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), batch_size=16,
                                               repeats=30), name="e2e")
        assert job.state == "queued"
        events = sse_events(stack, key, job.id)
        states = [e["state"] for e in events if e["event"] == "state"]
        assert states[0] == "queued" and states[-1] == "succeeded" and "running" in states
        progress = [e["progress"] for e in events if e["event"] == "progress"]
        stages = [p["stage"] for p in progress]
        assert {"load", "warmup", "measure", "done"} <= set(stages), stages
        fractions = [p["fraction"] for p in progress]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0
        ids = [e["id"] for e in events]
        assert len(ids) == len(set(ids))

        done = client.jobs.get(job.id)
        assert done.state == "succeeded" and done.attempts == 1
        assert done.progress.stage == "done"  # the record keeps the last progress too
        result = done.result
        assert isinstance(result, BenchmarkResult)
        assert result.model == "digits-cnn" and result.batch_size == 16
        assert 0 < result.latency.median_ms <= result.latency.p90_ms
        assert result.latency.repeats >= 30
        assert result.throughput_per_s == pytest.approx(16 / (result.latency.median_ms / 1e3))
        assert {layer.name for layer in result.per_layer} >= {"conv1", "conv2", "fc1"}
        assert result.environment.versions["torch"].startswith("2.13")
        if platform.libc_ver()[0] == "glibc":  # the pool process set the allocator up first
            assert result.environment.allocator.startswith("glibc"), result.environment

        arts = {a.name: a for a in done.artifacts}
        assert set(arts) >= {"benchmark.json", "job-attempt1.log"}
        got = client.jobs.download(job.id, "benchmark.json", stack.root / "dl.json").read_bytes()
        stored = stored_object(shared_store, job.id, "benchmark.json").read_bytes()
        assert got == stored
        assert hashlib.sha256(got).hexdigest() == arts["benchmark.json"].sha256
        assert BenchmarkResult.model_validate_json(got) == result
        # A stored object damaged after the job (same size, one byte changed): both clients
        # refuse it by its recorded sha256 and leave nothing behind; mended, it downloads again.
        obj = stored_object(shared_store, job.id, "benchmark.json")
        obj.write_bytes(got[:10] + bytes([got[10] ^ 1]) + got[11:])
        try:
            with pytest.raises(IntegrityError, match="sha256"):
                client.jobs.download(job.id, "benchmark.json", stack.root / "bad.json")

            async def via_async() -> None:
                async with AsyncClient(api_key=key, base_url=stack.base_url) as ac:
                    await ac.jobs.download(job.id, "benchmark.json", stack.root / "bad.json")

            with pytest.raises(IntegrityError, match="sha256"):
                asyncio.run(via_async())
            assert not list(stack.root.glob("bad.json*"))
            # One byte longer than recorded: the server sends the declared length and stops;
            # the stream breaks off, a typed error, and again nothing is left behind.
            obj.write_bytes(got + b" ")
            with pytest.raises(APIConnectionError, match=r"download of benchmark\.json from \S+ failed"):
                client.jobs.download(job.id, "benchmark.json", stack.root / "bad.json")
            with pytest.raises(APIConnectionError, match="failed"):
                asyncio.run(via_async())
            assert not list(stack.root.glob("bad.json*"))
        finally:
            obj.write_bytes(got)
        assert client.jobs.download(job.id, "benchmark.json", stack.root / "ok.json").read_bytes() == got
        # A folder that does not exist yet, written with a trailing slash, is made (README).
        into = client.jobs.download(job.id, "benchmark.json", f"{stack.root}/new-folder/")
        assert into == stack.root / "new-folder" / "benchmark.json" and into.read_bytes() == got

        # Replaying from an event id gives only what came after it.
        mid = events[len(events) // 2]["id"]
        replay = list(client.jobs.events(job.id, last_event_id=mid))
        assert [e.id for e in replay] == ids[len(events) // 2 + 1:]
        # Resuming after the final event: the stream holds nothing more and ends at once, not
        # after a 10 s wait for events a finished job will never send.
        t0 = time.monotonic()
        r = httpx.get(f"{stack.base_url}/v1/jobs/{job.id}/events", timeout=30, headers={
            "Authorization": f"Bearer {key}", "Last-Event-ID": ids[-1]})
        assert r.status_code == 200 and "data:" not in r.text
        assert time.monotonic() - t0 < 5
        r = httpx.get(f"{stack.base_url}/v1/jobs/{job.id}/events", timeout=10, headers={
            "Authorization": f"Bearer {key}", "Last-Event-ID": f"{2**64}-0"})
        assert r.status_code == 422 and "below 2**64" in r.text, r.text
        assert any("succeeded" in line for line in client.jobs.log(job.id))


def _measuring_for_minutes(client: Client) -> Job:
    """A digits-cnn benchmark that keeps measuring for two minutes, once it has started."""
    job = client.jobs.create(BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), repeats=10,
                                           min_time_s=120, per_layer=False))
    wait_for(lambda: client.jobs.get(job.id).progress.stage == "measure", 60,
             "the job to start measuring")
    return job


def test_cancel_running_job_frees_worker(stack: Stack) -> None:
    with stack.client() as client:
        long = _measuring_for_minutes(client)
        t0 = time.monotonic()
        client.jobs.cancel(long.id)
        job = client.jobs.wait(long.id, timeout=30, raise_on_failure=False)
        assert job.state == "cancelled" and job.cancel_requested
        assert time.monotonic() - t0 < 15  # the engine checks the flag between runs
        assert job.runs[-1].outcome == "cancelled"
        with pytest.raises(JobFailedError):
            client.jobs.wait(long.id)
        # The worker is free: the next job runs to the end.
        nxt = client.jobs.create(BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), repeats=5,
                                               per_layer=False))
        assert client.jobs.wait(nxt.id, timeout=60).state == "succeeded"


def test_force_cancel_closes_the_job_and_its_run(stack: Stack) -> None:
    with stack.client() as client:
        long = _measuring_for_minutes(client)
        job = client.jobs.cancel(long.id, force=True)
        assert job.state == "cancelled" and job.error is not None and job.finished_at
        [run] = job.runs  # the killed attempt could not say how it ended; the API did
        assert run.outcome == "cancelled" and run.finished_at is not None
        # The worker's pool replaced the killed process: the next job runs.
        nxt = client.jobs.create(BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), repeats=3,
                                               per_layer=False))
        assert client.jobs.wait(nxt.id, timeout=120).state == "succeeded"
        assert client.jobs.get(long.id).runs == [run]  # nothing wrote to it since
        # The killed attempt skipped its cleanup; the next task removed its work folder.
        assert list(Path(tempfile.gettempdir()).glob(f"*{long.id}*")) == []


def test_cancel_queued_job_is_immediate(stack: Stack) -> None:
    with stack.client() as client:
        blocker = client.jobs.create(BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), repeats=5,
                                                   min_time_s=5, per_layer=False))
        queued = client.jobs.create(BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), repeats=5))
        assert client.jobs.cancel(queued.id).state == "cancelled"
        assert client.jobs.wait(blocker.id, timeout=60).state == "succeeded"
        # The worker dropped the cancelled delivery instead of running it.
        after = client.jobs.get(queued.id)
        assert after.state == "cancelled" and after.attempts == 0


def test_tenancy(stack: Stack, tmp_path: Path) -> None:
    owner, other = stack.client(), stack.client()
    with owner, other:
        model = owner.models.upload(export_tiny(tmp_path / "tiny.pt2"), name="tiny")
        job = owner.jobs.create(BenchmarkSpec(model=ModelRef(id=model.id), repeats=5))
        owner.jobs.wait(job.id, timeout=60)
        with pytest.raises(NotFoundError):
            other.jobs.get(job.id)
        with pytest.raises(NotFoundError):
            other.models.get(model.id)
        with pytest.raises(NotFoundError):
            other.jobs.download(job.id, "benchmark.json", tmp_path / "x.json")
        with pytest.raises(NotFoundError):
            other.jobs.cancel(job.id)
        with pytest.raises(NotFoundError):  # a job may not use another tenant's model
            other.jobs.create(BenchmarkSpec(model=ModelRef(id=model.id)))
        assert other.jobs.list().items == [] and other.models.list() == []
        assert [m.id for m in owner.models.list()] == [model.id]

    r = httpx.get(f"{stack.base_url}/v1/jobs/{job.id}")
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    with Client(base_url=stack.base_url, api_key="mp_not-a-real-key", max_retries=0) as bad, \
            pytest.raises(AuthenticationError):
        bad.jobs.list()


def test_malformed_spec_names_the_field(stack: Stack) -> None:
    key = stack.key()
    for kind in ("benchmark", "mixed_precision"):  # the path reads like the JSON: no union tag
        r = httpx.post(f"{stack.base_url}/v1/jobs", headers={"Authorization": f"Bearer {key}"},
                       json={"spec": {"kind": kind, "model": {"zoo": "digits-cnn"},
                                      "batch_size": 0}})
        assert r.status_code == 422
        err = r.json()["error"]
        assert [f["field"] for f in err["fields"]] == ["spec.batch_size"], err
        assert err["message"].startswith("spec.batch_size: ")
    r = httpx.post(f"{stack.base_url}/v1/jobs", content=b'{"spec": ', headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"] == "body: not valid JSON at character 9: Expecting value"
    with stack.client(key) as client:
        with pytest.raises(UnprocessableEntityError, match="kind"):
            client.jobs.create({"kind": "nope", "model": {"zoo": "digits-cnn"}})
        with pytest.raises(UnprocessableEntityError, match="zoo"):
            client.jobs.create({"kind": "benchmark", "model": {"zoo": "resnet9000"}})
        with pytest.raises(UnprocessableEntityError, match="exactly one"):
            client.jobs.create({"kind": "benchmark", "model": {}})


def test_unknown_model_and_dataset_are_404(stack: Stack) -> None:
    with stack.client() as client:
        with pytest.raises(NotFoundError, match="model"):
            client.jobs.create({"kind": "benchmark", "model": {"id": "mdl_" + "0" * 32}})
        with pytest.raises(NotFoundError, match="dataset"):
            client.jobs.create({"kind": "benchmark", "model": {"zoo": "digits-cnn"},
                                "dataset": {"id": "dst_" + "0" * 32}})
        with pytest.raises(NotFoundError):
            client.jobs.get("job_" + "0" * 32)


def test_upload_over_limit_is_413(stack: Stack, tmp_path: Path) -> None:
    limit = int(stack.env["MODELPRESS_MAX_UPLOAD_BYTES"])
    key = stack.key()

    def body() -> Any:  # chunked: no Content-Length, so the limit is enforced while streaming
        chunk = b"\0" * 2**20
        for _ in range(limit // len(chunk) + 2):
            yield chunk

    r = httpx.post(f"{stack.base_url}/v1/models", params={"name": "big"}, content=body(),
                   headers={"Authorization": f"Bearer {key}",
                            "Content-Type": "application/octet-stream"}, timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    big = tmp_path / "big.pt2"
    with big.open("wb") as fh:
        fh.truncate(limit + 1)
    with stack.client(key) as client, pytest.raises(PayloadTooLargeError):
        client.models.upload(big)
    assert not list((stack.root / "tmp").glob("upload-*"))  # nothing left behind


def test_pickle_disguised_as_model_is_rejected_unexecuted(stack: Stack, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    raw = tmp_path / "model.pt2"
    raw.write_bytes(hostile_pickle(marker))
    tiny = export_tiny(tmp_path / "tiny.pt2")
    flagged = pt2_with_pickled_weights(tmp_path / "flagged.pt2", marker, tiny)
    with stack.client() as client:
        with pytest.raises(UnprocessableEntityError, match="pickle"):
            client.models.upload(raw)
        with pytest.raises(UnprocessableEntityError, match="pickle"):
            client.models.upload(flagged)
        assert client.models.list() == []
    assert not marker.exists()


def test_checksum_mismatch_is_400(stack: Stack, tmp_path: Path) -> None:
    tiny = export_tiny(tmp_path / "tiny.pt2")
    r = httpx.post(f"{stack.base_url}/v1/models", params={"name": "tiny"}, content=tiny.read_bytes(),
                   headers={"Authorization": f"Bearer {stack.key()}",
                            "Content-Type": "application/octet-stream",
                            "X-Content-SHA256": "0" * 64})
    assert r.status_code == 400 and "checksum" in r.json()["error"]["message"]
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with stack.client() as client, pytest.raises(BadRequestError, match="empty"):
        client.datasets.upload(empty)


def test_failing_job_keeps_error_log_and_inputs(stack: Stack, tmp_path: Path,
                                                shared_store: Path) -> None:
    with stack.client() as client:
        model = client.models.upload(export_tiny(tmp_path / "tiny.pt2"), name="tiny")
        # The exported model takes (4, 16); (4, 5) makes its forward raise inside the worker.
        job = client.jobs.create(BenchmarkSpec(model=ModelRef(id=model.id), input_shape=[4, 5]))
        with pytest.raises(JobFailedError) as info:
            client.jobs.wait(job.id, timeout=60)
        failed = info.value.job
        assert failed.state == "failed" and failed.error is not None
        assert "does not run on the given inputs" in failed.error.message
        assert failed.spec == job.spec
        log = client.jobs.log(job.id)
        assert any("does not run" in line for line in log)
        assert "job-attempt1.log" in {a.name for a in failed.artifacts}
        assert client.models.get(model.id).sha256 == model.sha256
        assert [p for p in shared_store.rglob("*") if model.id in p.parts and p.is_file()]
        # The same model with its own shape runs: the input was kept intact.
        ok = client.jobs.create(BenchmarkSpec(model=ModelRef(id=model.id), repeats=5))
        assert client.jobs.wait(ok.id, timeout=60).state == "succeeded"


def test_idempotent_create_and_paging(stack: Stack) -> None:
    with stack.client() as client:
        spec = BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), repeats=3, per_layer=False)
        a = client.jobs.create(spec, idempotency_key="retry-key-0001")
        b = client.jobs.create(spec, idempotency_key="retry-key-0001")
        assert a.id == b.id
        with pytest.raises(UnprocessableEntityError, match=f"already made job {a.id} from another"):
            client.jobs.create(spec.model_copy(update={"repeats": 4}),
                               idempotency_key="retry-key-0001")
        with pytest.raises(UnprocessableEntityError, match="another spec or name"):
            client.jobs.create(spec, name="renamed", idempotency_key="retry-key-0001")
        others = [client.jobs.create(spec) for _ in range(2)]
        for j in [a, *others]:
            client.jobs.wait(j.id, timeout=60)
        page1 = client.jobs.list(limit=2)
        assert [j.id for j in page1.items] == [others[1].id, others[0].id]
        assert page1.next_cursor is not None
        page2 = client.jobs.list(limit=2, cursor=page1.next_cursor)
        assert [j.id for j in page2.items] == [a.id] and page2.next_cursor is None
        assert {j.id for j in client.jobs.iter(state="succeeded", kind="benchmark")} == {
            a.id, *(o.id for o in others)}

        async def async_iter() -> list[str]:
            async with AsyncClient(api_key=client.api_key, base_url=stack.base_url) as ac:
                return [j.id async for j in ac.jobs.iter(kind="benchmark")]

        assert asyncio.run(async_iter()) == [others[1].id, others[0].id, a.id]
        assert client.jobs.list(state="failed").items == []


def _owned_files(store: Path, resource_id: str) -> list[Path]:
    return [p for p in store.rglob("*") if resource_id in p.parts]


def test_delete_a_finished_job_with_its_files_never_a_live_one(stack: Stack,
                                                             shared_store: Path) -> None:
    spec = BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), repeats=3, per_layer=False)
    with stack.client() as client:
        done = client.jobs.wait(client.jobs.create(spec, idempotency_key="delete-key-0001").id,
                                timeout=60)
        files = [p for p in _owned_files(shared_store, done.id) if p.is_file()]
        assert sorted(p.name for p in files) == sorted(a.name for a in done.artifacts)
        assert len(files) >= 2 and stack.redis.keys(f"mp:job:{done.id}*")
        stack.redis.hset(records.memo_key(done.id), "value", "{}")  # as a search leaves it

        live = _measuring_for_minutes(client)
        with pytest.raises(ConflictError, match="cancel it first"):
            client.jobs.delete(live.id)
        assert client.jobs.get(live.id).state == "running"  # untouched by the refusal

        assert client.jobs.delete(done.id) == Deleted(id=done.id, object="job",
                                                      files_removed=len(files))
        assert _owned_files(shared_store, done.id) == []  # its folders too
        assert stack.redis.keys(f"mp:job:{done.id}*") == []
        with pytest.raises(NotFoundError):
            client.jobs.get(done.id)
        with pytest.raises(NotFoundError):
            client.jobs.delete(done.id)
        assert done.id not in {j.id for j in client.jobs.iter()}
        # The deleted job's Idempotency-Key is free again: the same key makes a new job.
        again = client.jobs.create(spec, idempotency_key="delete-key-0001")
        assert again.id != done.id

        client.jobs.cancel(live.id)
        assert client.jobs.wait(live.id, timeout=30, raise_on_failure=False).state == "cancelled"

        async def delete_async() -> Deleted:
            async with AsyncClient(api_key=client.api_key, base_url=stack.base_url) as ac:
                return await ac.jobs.delete(live.id)

        assert asyncio.run(delete_async()).files_removed == 1  # the cancelled attempt's log
        assert client.jobs.wait(again.id, timeout=60).state == "succeeded"


def test_delete_uploads_unless_a_live_job_names_them(stack: Stack, tmp_path: Path,
                                                    shared_store: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((8, 16), dtype=np.float32))
    with stack.client() as client:
        model = client.models.upload(export_tiny(tmp_path / "tiny.pt2"), name="tiny")
        data = client.datasets.upload(tmp_path / "d.npz")
        running = client.jobs.create(BenchmarkSpec(model=ModelRef(id=model.id), repeats=10,
                                                   min_time_s=120, per_layer=False))
        queued = client.jobs.create(BenchmarkSpec(model=ModelRef(zoo="digits-cnn"),
                                                  dataset=DatasetRef(id=data.id)))
        wait_for(lambda: client.jobs.get(running.id).state == "running", 60, "the job to start")
        replays = set(stack.redis.keys("mp:tenant:*:del:*"))
        with pytest.raises(ConflictError, match=running.id):
            client.models.delete(model.id)
        with pytest.raises(ConflictError, match=queued.id):
            client.datasets.delete(data.id)
        assert client.models.get(model.id) == model and client.datasets.get(data.id) == data
        # the SDK sent an Idempotency-Key with each: a refused delete leaves no replay behind
        assert set(stack.redis.keys("mp:tenant:*:del:*")) == replays

        client.jobs.cancel(queued.id)
        assert client.datasets.delete(data.id) == Deleted(id=data.id, object="dataset",
                                                          files_removed=1)
        client.jobs.cancel(running.id)
        client.jobs.wait(running.id, timeout=30, raise_on_failure=False)
        assert client.models.delete(model.id).files_removed == 1
        assert _owned_files(shared_store, model.id) == _owned_files(shared_store, data.id) == []
        assert client.models.list() == [] and client.datasets.list() == []
        for missing in (lambda: client.models.get(model.id), lambda: client.datasets.get(data.id),
                        lambda: client.models.delete(model.id),
                        lambda: client.jobs.create(BenchmarkSpec(model=ModelRef(id=model.id)))):
            with pytest.raises(NotFoundError):
                missing()
        # The finished job that used the model keeps its record and its log.
        assert client.jobs.get(running.id).state == "cancelled"


class LosingTransport(httpx.HTTPTransport):
    """A network that loses the replies to the first ``n`` requests of ``method`` after the
    server sent them."""

    def __init__(self, n: int, method: str = "DELETE") -> None:
        super().__init__()
        self.to_lose, self.sent, self.method = n, 0, method

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == self.method:
            self.sent += 1
            if self.to_lose:
                self.to_lose -= 1
                response.read()
                response.close()
                raise httpx.ReadError("the reply was lost", request=request)
        return response


def test_a_delete_whose_reply_was_lost_is_answered_on_retry(stack: Stack, tmp_path: Path,
                                                           shared_store: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 16), dtype=np.float32))
    lossy, key = LosingTransport(n=0), stack.key()
    with stack.client(key, http_client=httpx.Client(transport=lossy)) as client:
        model = client.models.upload(export_tiny(tmp_path / "tiny.pt2"), name="tiny")
        data = client.datasets.upload(tmp_path / "d.npz")
        done = client.jobs.wait(client.jobs.create(BenchmarkSpec(
            model=ModelRef(id=model.id), repeats=2, per_layer=False)).id, timeout=60)
        files = len([p for p in _owned_files(shared_store, done.id) if p.is_file()])
        assert files >= 2

        # Each first reply is lost after the server did the work; the SDK's retry, with the same
        # key, gets the first answer (not a 404), files counted by the try that removed them.
        lossy.to_lose = 3
        assert client.jobs.delete(done.id) == Deleted(id=done.id, object="job", files_removed=files)
        assert client.models.delete(model.id) == Deleted(id=model.id, object="model",
                                                         files_removed=1)
        assert client.datasets.delete(data.id).files_removed == 1
        assert lossy.sent == 6 and lossy.to_lose == 0
        for gone in (done.id, model.id, data.id):
            assert _owned_files(shared_store, gone) == []
        # A new delete (a new key) of what is gone is still a 404.
        with pytest.raises(NotFoundError):
            client.models.delete(model.id)

        other, crashed = client.datasets.upload(tmp_path / "d.npz"), client.datasets.upload(
            tmp_path / "d.npz")

    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {key}"}) as http:
        # One key names one target.
        assert http.delete(f"/v1/datasets/{other.id}",
                           headers={"Idempotency-Key": "reused-key-02"}).status_code == 200
        r = http.delete(f"/v1/models/{model.id}", headers={"Idempotency-Key": "reused-key-02"})
        assert r.status_code == 422 and "used to delete dataset" in r.json()["error"]["message"]

        # An API process that died right after taking the record out: the record is only in
        # the key's replay, and a retry with that key finishes the delete.
        tenant = json.loads(stack.redis.get(records.asset_key("datasets", crashed.id)))["tenant"]
        replay = records.delete_replay_key(tenant, "crashed-key-1")
        taken = stack.redis.eval(records.TAKE_UPLOAD, 4, records.asset_key("datasets", crashed.id),
                                 records.tenant_assets_key(tenant, "datasets"), replay,
                                 records.PENDING_DELETES_KEY, crashed.id, f"dataset {crashed.id}",
                                 "crashed-try", time.time())
        assert taken[0] and http.get(f"/v1/datasets/{crashed.id}").status_code == 404
        assert _owned_files(shared_store, crashed.id)  # its file is still there
        r = http.delete(f"/v1/datasets/{crashed.id}", headers={"Idempotency-Key": "crashed-key-1"})
        assert r.status_code == 200 and r.json()["files_removed"] == 1
        assert _owned_files(shared_store, crashed.id) == []
        assert "answer" in json.loads(stack.redis.get(replay) or "{}")


def test_an_upload_whose_reply_was_lost_is_one_upload(stack: Stack, tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 16), dtype=np.float32))
    lossy, key = LosingTransport(n=1, method="POST"), stack.key()
    with stack.client(key, http_client=httpx.Client(transport=lossy)) as client:
        # the server stored the file and answered; the SDK's retry, with the same key, gets
        # that upload back instead of making a second one
        data = client.datasets.upload(tmp_path / "d.npz", name="d")
        assert lossy.sent == 2 and [d.id for d in client.datasets.list()] == [data.id]

    body, other = (tmp_path / "d.npz").read_bytes(), io.BytesIO()
    np.savez(other, x=np.ones((4, 16), dtype=np.float32))
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {key}",
                                                        "Content-Type": "application/octet-stream"}
                      ) as http:
        def post(key: str, content: bytes) -> httpx.Response:
            return http.post("/v1/datasets", params={"name": "e"}, content=content,
                             headers={"Idempotency-Key": key})

        first, again = post("upload-key-01", body), post("upload-key-01", body)
        assert (first.status_code, again.status_code) == (201, 200)
        assert again.json() == first.json()
        r = post("upload-key-01", other.getvalue())  # one key, one file
        assert r.status_code == 422 and "sent with another file" in r.json()["error"]["message"]
        # tries that overlap make one upload too: one 201, the others 200 with its record
        with ThreadPoolExecutor(4) as pool:
            tries = list(pool.map(lambda _: post("upload-key-02", body), range(4)))
        assert sorted(t.status_code for t in tries) == [200, 200, 200, 201]
        assert len({t.json()["id"] for t in tries}) == 1
        listed = http.get("/v1/datasets").json()["items"]
        assert len(listed) == 3 and {first.json()["id"], tries[0].json()["id"], data.id} == {
            d["id"] for d in listed}
        # another tenant's same key is another upload
        other_key = stack.key()
        r = http.post("/v1/datasets", params={"name": "e"}, content=body,
                      headers={"Idempotency-Key": "upload-key-01",
                               "Authorization": f"Bearer {other_key}"})
        assert r.status_code == 201 and r.json()["id"] != first.json()["id"]
        # a late retry of an upload deleted since does not bring it back
        assert http.delete(f"/v1/datasets/{first.json()['id']}").status_code == 200
        r = post("upload-key-01", body)
        assert r.status_code == 409 and "has been deleted" in r.json()["error"]["message"]
        assert http.get(f"/v1/datasets/{first.json()['id']}").status_code == 404
        assert post("upload-key-03", body).status_code == 201  # a new key uploads it again


def _cancelled_job(tmp_path: Path, redis_server: _stack.EmbeddedRedis, job: str
                   ) -> tuple[Settings, redis.Redis, Store, WorkerContext]:
    """A cancelled job of tenant "t" in a fresh Redis database, with a local store and the
    context its (stale) attempt would write through."""
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/{fresh_db()}",
                        store_url=(tmp_path / "store").as_uri())
    r = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    r.flushdb()
    r.hset(records.job_key(job), mapping={"state": "cancelled", "attempts": "1", "tenant": "t"})
    store = open_store(settings)
    return settings, r, store, WorkerContext(job, "t", 1, settings, r, store, tmp_path / "work",
                                             who="w9")


def test_a_worker_that_finishes_after_the_delete_brings_nothing_back(
        tmp_path: Path, redis_server: _stack.EmbeddedRedis) -> None:
    """A fan-out piece (or a stale attempt) still computing when its job is cancelled and
    deleted: its memo values, log lines, run record and artifacts are not written."""
    job = "job_" + "1" * 32
    _, r, store, ctx = _cancelled_job(tmp_path, redis_server, job)
    ctx.memo_put("value", {"v": 1})
    ctx.append_log("a line")
    ctx.save_artifact("a.json", b"{}", "application/json")
    assert r.hget(records.memo_key(job), "value") and r.llen(records.log_key(job)) == 1
    assert (tmp_path / "store" / records.artifact_object("t", job, "a.json")).is_file()

    # what DELETE /v1/jobs/{id} does: the files, then the keys
    for key in store.list_keys(records.artifact_object("t", job, "")):
        store.delete(key)
    assert r.eval(records.DELETE_JOB, 4 + len(records.job_keys(job)), records.tenant_jobs_key("t"),
                  records.idempotency_key("t", ""), records.FINISHED_KEY,
                  records.delete_replay_key("t", ""), *records.job_keys(job), "t", job, "",
                  records.IDEMPOTENCY_TTL_S) == "deleted"

    with pytest.raises(JobCancelled):
        ctx.memo_put("late", {"v": 2})
    ctx.append_log("a late line")
    with pytest.raises(JobCancelled):
        ctx.save_artifact("late.json", b"{}", "application/json")
    runner._record_run(r, job, RunAttempt(attempt=1, worker="w9", started_at=records.now(),
                                          outcome="cancelled"))
    assert r.keys(f"mp:job:{job}*") == []
    assert not [p for p in (tmp_path / "store").rglob("*") if job in p.parts]


def test_an_artifact_stored_while_the_delete_sweeps_is_swept_too(
        tmp_path: Path, redis_server: _stack.EmbeddedRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale attempt stores an artifact just after DELETE listed the job's files, while the job
    still exists (so its record goes in): the sweep after the keys are gone removes it."""
    job = "job_" + "2" * 32
    settings, r, store, ctx = _cancelled_job(tmp_path, redis_server, job)
    ctx.save_artifact("a.json", b"{}", "application/json")

    first_sweep, late = store.delete_prefix_async, []

    async def sweep_then_a_late_write(prefix: str) -> int:
        removed = await first_sweep(prefix)
        if not late:
            late.append(ctx.save_artifact("late.json", b"{}", "application/json"))
        return removed

    monkeypatch.setattr(store, "delete_prefix_async", sweep_then_a_late_write)

    async def delete() -> Deleted:
        svc = Services(settings, async_client(settings), store, celery=None)  # type: ignore[arg-type]
        try:
            return await jobs.delete_job(svc, "t", job)
        finally:
            await svc.redis.aclose()

    assert asyncio.run(delete()) == Deleted(id=job, object="job", files_removed=2)
    assert late and not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert r.keys(f"mp:job:{job}*") == []


def test_readyz_and_docs(stack: Stack) -> None:
    r = httpx.get(f"{stack.base_url}/readyz")
    assert r.status_code == 200
    assert r.json()["checks"]["worker"].startswith("ok")
    assert r.json()["checks"]["worker"].endswith("; queues cpu)")  # the stack's worker: -Q cpu
    spec = httpx.get(f"{stack.base_url}/openapi.json").json()
    assert "/v1/jobs/{job_id}/events" in spec["paths"]
    assert httpx.get(f"{stack.base_url}/docs").status_code == 200


def test_a_job_for_a_queue_no_worker_serves_says_so(stack: Stack) -> None:
    """The stack's worker consumes `cpu` only: a `device: cuda` job is accepted and queued on
    `gpu`, and its progress says that no worker serves that queue and how to start one."""
    with stack.client() as client:
        cpu = client.jobs.create(LossBenchmarkSpec(n=8, d=8, vocab_sizes=[16], repeats=1,
                                                   impls=["torch"]))
        gpu = client.jobs.create(LossBenchmarkSpec(n=8, d=8, vocab_sizes=[16], device="cuda"))
        assert (cpu.queue, cpu.progress.message) == ("cpu", "waiting for a worker")
        assert gpu.queue == "gpu" and gpu.state == "queued"
        assert gpu.progress.message == (
            "waiting for a worker on the `gpu` queue: none is running now (start one with "
            "`modelpress worker` on a machine with CUDA)")
        assert client.jobs.get(gpu.id).progress.message == gpu.progress.message
        assert client.jobs.cancel(gpu.id).state == "cancelled"
        assert client.jobs.wait(cpu.id, timeout=120).state == "succeeded"


def test_hf_folder_and_dataset_uploads_run(stack: Stack, tmp_path: Path) -> None:
    import numpy as np

    with stack.client() as client:
        hf = client.models.upload(tiny_hf_folder(tmp_path / "tiny-bert"), name="tiny-bert")
        assert hf.format == "hf"
        job = client.jobs.create(BenchmarkSpec(model=ModelRef(id=hf.id), batch_size=4, repeats=5,
                                               dataset={"builtin": "sentences"}))  # type: ignore[arg-type]
        res = client.jobs.wait(job.id, timeout=120).result
        assert isinstance(res, BenchmarkResult)
        assert res.input_shapes[0][0] == 4 and len(res.input_shapes) == 2  # ids and mask

        mlp = client.models.upload(export_tiny(tmp_path / "tiny.pt2"), name="tiny")
        # An uploaded model with a built-in dataset its format cannot read: refused at submit.
        for model, builtin, fits in ((hf, "digits-test", "sentences"),
                                     (mlp, "sentences", "digits-test or digits-calib")):
            with pytest.raises(UnprocessableEntityError,
                               match=f"uploaded {model.format} model cannot read the built-in "
                                     f"dataset {builtin}; use {fits}"):
                client.jobs.create(BenchmarkSpec(model=ModelRef(id=model.id),
                                                 dataset={"builtin": builtin}))  # type: ignore[arg-type]
        data = tmp_path / "data.npz"
        np.savez(data, x=np.random.default_rng(0).standard_normal((64, 16), dtype=np.float32),
                 y=np.arange(64) % 4)
        ds = client.datasets.upload(data, name="rows")
        assert ds.tensors["x"].shape == [64, 16]
        assert client.datasets.get(ds.id) == ds
        # Over plain REST without `format`, the server tells the two dataset formats apart.
        from safetensors.numpy import save_file

        save_file({"x": np.zeros((8, 16), np.float32)}, str(tmp_path / "rows.safetensors"))
        for file, fmt in ((data, "npz"), (tmp_path / "rows.safetensors", "safetensors")):
            r = httpx.post(f"{stack.base_url}/v1/datasets", params={"name": file.name},
                           content=file.read_bytes(),
                           headers={"Authorization": f"Bearer {client.api_key}",
                                    "Content-Type": "application/octet-stream"})
            assert r.status_code == 201 and r.json()["format"] == fmt, r.text
        job = client.jobs.create(BenchmarkSpec(model=ModelRef(id=mlp.id), batch_size=32,
                                               repeats=5, dataset={"id": ds.id}))  # type: ignore[arg-type]
        res = client.jobs.wait(job.id, timeout=60).result
        assert isinstance(res, BenchmarkResult) and res.input_shapes == [[32, 16]]
        # more than the dataset holds: refused at submit (it used to fail in the worker)
        with pytest.raises(UnprocessableEntityError, match="fewer than batch_size 128"):
            client.jobs.create(BenchmarkSpec(model=ModelRef(id=mlp.id), batch_size=128,
                                             dataset={"id": ds.id}))  # type: ignore[arg-type]


def test_loss_benchmark_job_through_the_api(stack: Stack) -> None:
    from app.schemas import LossBenchmarkResult

    with stack.client() as client:
        spec = LossBenchmarkSpec(n=128, d=32, vocab_sizes=[2048], repeats=1,
                                 impls=["torch", "chunked"])
        res = client.jobs.wait(client.jobs.create(spec).id, timeout=120).result
        assert isinstance(res, LossBenchmarkResult)
        assert [r.impl for r in res.rows] == ["torch", "chunked"]
        assert all(r.error is None and r.peak_extra_bytes is not None for r in res.rows)


def test_intrinsic_dimension_job_through_the_api(stack: Stack, tmp_path: Path) -> None:
    import json as _json

    import torch as _torch

    from app.schemas import IntrinsicDimensionResult, IntrinsicDimensionSpec
    from workers.engine import datasets
    from workers.engine.intrinsic import job as id_job
    from workers.engine.intrinsic.subspace import Artifact, evaluate, rebuild

    key = stack.key()
    with stack.client(key) as client:
        j = client.jobs.create(IntrinsicDimensionSpec(grid=[20, 400, 3000], epochs=3))
        done = client.jobs.wait(j.id, timeout=300)
        res = done.result
        # The dashboard's job list renders a spec whose model is a plain architecture name.
        page = httpx.get(f"{stack.base_url}/ui/jobs", cookies={"modelpress_key": key})
        assert page.status_code == 200 and "digits-mlp" in page.text
        assert isinstance(res, IntrinsicDimensionResult)
        assert res.parameters == 55_210 and res.training_runs >= 1
        if res.d_int90 is None:
            return
        assert res.d_int90 < res.parameters / 10
        art = Artifact(**_json.loads(client.jobs.download(j.id, "intrinsic.json",
                                                          tmp_path).read_bytes()))
    # The downloaded artifact alone rebuilds a model with the reported accuracy.
    te = datasets.digits("test")
    assert te.labels is not None
    model = rebuild(art, id_job.digits_mlp)
    with _torch.no_grad():
        acc = evaluate(model, None, te.inputs["x"], te.labels)
    assert acc == pytest.approx(res.rebuilt_accuracy, abs=1e-9) and acc >= res.target


def test_cli_submits_from_stdin_downloads_into_a_new_folder_and_deletes(stack: Stack, tmp_path: Path
                                                                ) -> None:
    """The README's CLI lines: a spec on stdin, `--wait`, `download ... -o out/`, `delete`."""
    import subprocess
    import sys

    env = {**os.environ, "MODELPRESS_BASE_URL": stack.base_url, "MODELPRESS_API_KEY": stack.key()}

    def cli(*args: str, stdin: str | None = None) -> str:
        proc = subprocess.run([sys.executable, "-m", "modelpress.cli", *args], input=stdin,
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    out = cli("jobs", "submit", "-", "--wait", stdin=json.dumps(
        {"kind": "benchmark", "model": {"zoo": "digits-cnn"}, "repeats": 3, "per_layer": False}))
    job_id = out.split()[0]
    assert job_id.startswith("job_") and "succeeded" in out, out
    got = tmp_path / cli("jobs", "download", job_id, "benchmark.json", "-o", "out/").strip()
    assert got == tmp_path / "out" / "benchmark.json"
    assert BenchmarkResult.model_validate_json(got.read_bytes()).latency.repeats >= 3
    assert cli("jobs", "delete", job_id).strip() == f"{job_id} deleted (2 stored files removed)"
    again = subprocess.run([sys.executable, "-m", "modelpress.cli", "jobs", "delete", job_id],
                           env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and f"job '{job_id}' not found" in again.stderr, again.stderr
    # a job for a queue no worker serves: submitted, and the CLI says why it will wait
    gpu = subprocess.run([sys.executable, "-m", "modelpress.cli", "jobs", "submit", "-"],
                         input=json.dumps({"kind": "loss_benchmark", "n": 8, "d": 8,
                                           "vocab_sizes": [16], "device": "cuda"}),
                         env=env, capture_output=True, text=True, timeout=120)
    assert gpu.returncode == 0 and gpu.stdout.startswith("job_"), gpu.stdout + gpu.stderr
    assert "note: waiting for a worker on the `gpu` queue: none is running now" in gpu.stderr
    assert cli("jobs", "cancel", gpu.stdout.strip()).strip() == f"{gpu.stdout.strip()} cancelled"
