"""Hostile input and secrets against a live stack: an artifact over the size limit, API keys
kept out of every log, and a schema-driven fuzz of every operation in the app's own OpenAPI
document (schemathesis), authenticated, that must find no 5xx."""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from app import records
from app.auth import hash_token
from app.schemas import BenchmarkSpec, ModelRef
from modelpress import _stack
from tests.conftest import Stack, make_stack, running
from tests.helpers import measured

pytestmark = pytest.mark.slow

LIMIT = 512  # bytes: a benchmark.json is larger, a job log is exempt
QUICK = BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), repeats=3, warmup=1, per_layer=False)
EXAMPLES = 30  # per operation and generation mode: bounds the fuzz to about a minute here


@pytest.fixture(scope="module")
def hostile_stack(tmp_path_factory: pytest.TempPathFactory, redis_server: _stack.EmbeddedRedis,
                  shared_store: Path) -> Iterator[Stack]:
    s = make_stack(tmp_path_factory.mktemp("hostile"), redis_server, {
        "MODELPRESS_STORE_URL": shared_store.as_uri(),
        "MODELPRESS_MAX_ARTIFACT_BYTES": str(LIMIT),
        "MODELPRESS_MAX_UPLOAD_BYTES": str(4 * 2**20),
    })
    s.access_log = True
    yield from running(s)


def test_an_artifact_over_the_limit_fails_the_job_and_stores_nothing(
        hostile_stack: Stack, shared_store: Path) -> None:
    with hostile_stack.client() as client:
        job = client.jobs.create(QUICK)
        done = client.jobs.wait(job.id, timeout=90, raise_on_failure=False)
        log = client.jobs.log(job.id)
    assert done.state == "failed" and done.error is not None
    assert done.error.type == "artifact_too_large"
    assert "benchmark.json" in done.error.message and f"limit of {LIMIT} bytes" in done.error.message
    assert done.attempts == 1 and len(done.runs) == 1
    assert any("artifact_too_large" in line or "over the limit" in line for line in log)
    # the log is kept (as an artifact too); the oversized artifact was never written
    assert [a.name for a in done.artifacts] == ["job-attempt1.log"]
    assert not list(shared_store.glob(f"tenants/*/jobs/{job.id}/artifacts/benchmark.json"))


def test_api_keys_never_reach_a_log_or_redis(hostile_stack: Stack) -> None:
    s = hostile_stack
    valid = s.key()
    unknown = "mp_" + secrets.token_urlsafe(32)  # well-formed, never issued
    url = s.base_url
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/v1/jobs", headers={"Authorization": f"Bearer {unknown}"}
                        ).status_code == 401
        assert http.get("/v1/jobs", headers={"Authorization": f"Bearer {valid}x"}
                        ).status_code == 401
        assert http.post("/ui/login", data={"key": unknown}).status_code == 401
        assert http.get("/v1/jobs", headers={"Authorization": f"Bearer {valid}"}).status_code == 200
        http.cookies.set("modelpress_key", valid)
        assert http.get("/ui/jobs").status_code == 200
        http.cookies.clear()
        r = http.post("/v1/jobs", json={"spec": QUICK.model_dump(mode="json")},
                      headers={"Authorization": f"Bearer {valid}"})
        assert r.status_code == 201
        job_id = r.json()["id"]
    with s.client(valid) as client:
        done = client.jobs.wait(job_id, timeout=90, raise_on_failure=False)
        job_log = client.jobs.log(job_id)
        attempt_log = client.jobs.download(job_id, "job-attempt1.log", s.root).read_text()
    assert done.state in ("succeeded", "failed")

    texts = {p.name: p.read_text(errors="replace") for p in (s.root / "logs").glob("*.log")}
    texts["job log"] = "\n".join(job_log)
    texts["job-attempt1.log"] = attempt_log
    # these are the right files: the requests and the job are in them
    assert job_id in texts["w1.log"] and "attempt 1 on w1@" in texts["job log"]
    assert "/v1/jobs" in texts["api.log"] and " 401" in texts["api.log"]
    for token in (valid, unknown):
        for name, text in texts.items():
            assert token not in text and token[3:] not in text, f"a key is in {name}"
    # Redis holds only the digest of a key, never the key
    r = s.redis
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        values = ([r.get(key)] if kind == "string" else
                  list(r.hgetall(key).values()) if kind == "hash" else
                  r.lrange(key, 0, -1) if kind == "list" else
                  [fields for _, fields in r.xrange(key)] if kind == "stream" else [])
        assert valid not in key and not any(valid in str(v) for v in values), key
    assert r.exists(records.apikey_key(hash_token(valid)))


def _fuzz(op: schemathesis.APIOperation[Any, Any, Any, Any], mode: GenerationMode,
          base_url: str, key: str, codes: Counter[int], failures: list[str]) -> None:
    """EXAMPLES cases of one operation, each sent with the key; 5xx answers are collected."""
    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],  # no shrinking: nothing raises
              suppress_health_check=list(HealthCheck))
    def call(case: schemathesis.Case[Any]) -> None:
        resp = case.call(base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {key}"})
        codes[resp.status_code] += 1
        if resp.status_code >= 500:
            failures.append(f"{resp.status_code} from {case.as_curl_command()}")

    try:
        call()
    except Unsatisfiable:  # nothing to make invalid (an operation without inputs)
        assert mode == GenerationMode.NEGATIVE


def test_schema_fuzz_finds_no_server_error(hostile_stack: Stack) -> None:
    s = hostile_stack
    key = s.key()
    schema = schemathesis.openapi.from_url(f"{s.base_url}/openapi.json")
    codes: dict[GenerationMode, Counter[int]] = {m: Counter() for m in GenerationMode}
    failures: list[str] = []
    results = list(schema.get_all_operations())
    assert all(isinstance(r, Ok) for r in results), results  # the app's schema is valid
    operations = [r.ok() for r in results if isinstance(r, Ok)]

    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(op, mode, s.base_url, key, codes[mode], failures)

    # jobs the fuzz created must not keep the worker busy after the test
    with s.client(key) as client:
        for job in client.jobs.iter():
            if job.state in ("queued", "running"):
                client.jobs.cancel(job.id, force=job.state == "running")
    valid, invalid = codes[GenerationMode.POSITIVE], codes[GenerationMode.NEGATIVE]
    tried = sum(valid.values()) + sum(invalid.values())
    measured.append(f"fuzz: {tried} cases tried over {len(operations)} operations, "
                    f"{len(failures)} failures (status codes: valid requests "
                    f"{dict(sorted(valid.items()))}, invalid {dict(sorted(invalid.items()))})")
    assert not failures, "\n".join(failures[:10])
    # valid requests got past the key check to the routes (negative cases also drop the key)
    assert valid[401] == 0 and valid[200] and invalid[422] and invalid[401]
    assert httpx.get(f"{s.base_url}/healthz", timeout=10).status_code == 200
