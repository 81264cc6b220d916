"""Hostile input against a live API with a valid key: huge headers, wrong content types, files
whose declared shapes their bytes cannot hold, and job specs with huge numbers. Each request gets
a 4xx with a message, and none leaves an asset, a stored object, an upload temp file or a job."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.schemas import BenchmarkSpec, ModelRef
from modelpress import _stack
from tests.conftest import Stack, make_stack, running
from tests.helpers import export_tiny, measured, rewrite_zip

pytestmark = pytest.mark.slow

answers: list[int] = []  # every hostile request's status code, for the measured line


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile-inputs-store")


@pytest.fixture(scope="module")
def inputs_stack(tmp_path_factory: pytest.TempPathFactory, redis_server: _stack.EmbeddedRedis,
                 store: Path) -> Iterator[Stack]:
    s = make_stack(tmp_path_factory.mktemp("hostile-inputs"), redis_server, {
        "MODELPRESS_STORE_URL": store.as_uri(),
        "MODELPRESS_MAX_UPLOAD_BYTES": str(4 * 2**20),
    })
    yield from running(s)


def _http(s: Stack, key: str) -> httpx.Client:
    return httpx.Client(base_url=s.base_url, timeout=30, headers={"Authorization": f"Bearer {key}"})


def _refused(r: httpx.Response, codes: set[int], *words: str) -> str:
    """The answer is one of ``codes`` with a JSON error whose message holds every word."""
    answers.append(r.status_code)
    assert r.status_code in codes, (r.status_code, r.text[:300])
    message: str = r.json()["error"]["message"]
    for word in words:
        assert word in message, (word, message)
    return message


def _nothing_left(s: Stack, http: httpx.Client, store: Path) -> None:
    assert http.get("/v1/models").json()["items"] == []
    assert http.get("/v1/datasets").json()["items"] == []
    assert http.get("/v1/jobs").json()["items"] == []
    assert [p for p in store.rglob("*") if p.is_file()] == []
    assert list((s.root / "tmp").glob("upload-*")) == []


def test_huge_headers_are_refused_and_the_api_keeps_answering(inputs_stack: Stack) -> None:
    s = inputs_stack
    key = s.key()
    for headers in ({"X-Big": "a" * 64 * 1024},
                    {f"X-Many-{i}": "v" * 16 for i in range(2000)}):
        with _http(s, key) as http:
            r = http.get("/v1/jobs", headers=headers)
        _refused(r, {431}, "headers too large")
        assert httpx.get(f"{s.base_url}/healthz", timeout=10).status_code == 200
    with _http(s, key) as http:  # the key still works on a fresh connection
        assert http.get("/v1/jobs").status_code == 200


def test_wrong_content_types_are_refused(inputs_stack: Stack, store: Path, tmp_path: Path) -> None:
    s = inputs_stack
    model = export_tiny(tmp_path / "tiny.pt2").read_bytes()  # a valid file: only the type is wrong
    with _http(s, s.key()) as http:
        for ctype in ("application/json", "text/plain"):
            r = http.post("/v1/models", params={"name": "m"}, content=model,
                          headers={"Content-Type": ctype})
            _refused(r, {415}, "application/octet-stream", ctype)
            r = http.post("/v1/datasets", params={"name": "d"}, content=b'{"x": [1]}',
                          headers={"Content-Type": ctype})
            _refused(r, {415}, "application/octet-stream")
        r = http.post("/v1/models", params={"name": "m"}, files={"file": ("tiny.pt2", model)})
        _refused(r, {415}, "application/octet-stream", "multipart/form-data")

        spec = {"spec": BenchmarkSpec(model=ModelRef(zoo="digits-cnn")).model_dump(mode="json")}
        r = http.post("/v1/jobs", data={"spec": json.dumps(spec["spec"])})
        _refused(r, {415}, "JSON", "Content-Type application/json")
        r = http.post("/v1/jobs", content=json.dumps(spec).encode(),
                      headers={"Content-Type": "text/plain"})
        _refused(r, {415}, "JSON", "Content-Type application/json")
        _nothing_left(s, http, store)


def _npz(arrays: dict[str, tuple[dict[str, Any], bytes]]) -> bytes:
    """An .npz whose .npy headers are written by hand, so a header may claim any shape."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, (header, data) in arrays.items():
            npy = io.BytesIO()
            np.lib.format.write_array_header_1_0(npy, header)
            zf.writestr(f"{name}.npy", npy.getvalue() + data)
    return buf.getvalue()


def _safetensors(shape: list[int], data: bytes) -> bytes:
    header = json.dumps({"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, len(data)]}})
    raw = header.encode().ljust(-(-len(header) // 8) * 8, b" ")
    return struct.pack("<Q", len(raw)) + raw + data


def test_absurd_shapes_are_refused_at_upload(inputs_stack: Stack, store: Path) -> None:
    s = inputs_stack
    y = ({"descr": "<i8", "fortran_order": False, "shape": (4,)}, bytes(32))
    huge = _npz({"x": ({"descr": "<f4", "fortran_order": False, "shape": (10**12, 10**6)},
                       bytes(16)), "y": y})
    short = _npz({"x": ({"descr": "<f4", "fortran_order": False, "shape": (4, 16)}, bytes(16)),
                  "y": y})
    st_huge = _safetensors([2**40], bytes(16))
    hf = io.BytesIO()
    with zipfile.ZipFile(hf, "w") as zf:
        zf.writestr("config.json", '{"model_type": "bert"}')
        zf.writestr("model.safetensors", st_huge)
    octet = {"Content-Type": "application/octet-stream"}
    with _http(s, s.key()) as http:
        for body, needed in ((huge, str(10**18 * 4)), (short, "256")):
            r = http.post("/v1/datasets", params={"name": "d", "format": "npz"}, content=body,
                          headers=octet)
            _refused(r, {422}, "'x.npy'", f"needs {needed} bytes", "holds 16")
        r = http.post("/v1/datasets", params={"name": "d", "format": "safetensors"},
                      content=st_huge, headers=octet)
        _refused(r, {422}, "'x'", f"needs {2**42} bytes", "holds 16")
        r = http.post("/v1/models", params={"name": "m"}, content=hf.getvalue(), headers=octet)
        _refused(r, {422}, "model.safetensors", f"needs {2**42} bytes")
        _nothing_left(s, http, store)


def test_malformed_files_are_refused_at_upload(inputs_stack: Stack, store: Path,
                                               tmp_path: Path) -> None:
    """Files whose JSON parts have the wrong types or are missing: a 422 saying what is wrong,
    never the 500 a parse error that no check anticipated would give."""
    s = inputs_stack
    listed = json.dumps([]).encode()
    st_list = struct.pack("<Q", len(listed)) + listed
    no_format = rewrite_zip(export_tiny(tmp_path / "tiny.pt2"), tmp_path / "bad.pt2",
                            lambda name, data: None if name.endswith("/archive_format") else data)
    hf = io.BytesIO()
    with zipfile.ZipFile(hf, "w") as zf:
        zf.writestr("config.json", '{"model_type": ')
        zf.writestr("vocab.txt", "[PAD]\n")
        zf.writestr("model.safetensors", _safetensors([4], bytes(16)))
    words = io.BytesIO()
    np.savez(words, x=np.zeros((3, 2), np.float32), y=np.array(["a", "b", "c"]))
    octet = {"Content-Type": "application/octet-stream"}
    with _http(s, s.key()) as http:
        r = http.post("/v1/datasets", params={"name": "d", "format": "safetensors"},
                      content=st_list, headers=octet)
        _refused(r, {422}, "header that is not a JSON object")
        r = http.post("/v1/models", params={"name": "m"}, content=no_format.read_bytes(),
                      headers=octet)
        _refused(r, {422}, "no archive_format")
        r = http.post("/v1/models", params={"name": "m"}, content=hf.getvalue(), headers=octet)
        _refused(r, {422}, "'config.json' is not valid JSON")
        r = http.post("/v1/datasets", params={"name": "d"}, content=words.getvalue(),
                      headers=octet)
        _refused(r, {422}, "'y.npy' holds <U1 values")
        _nothing_left(s, http, store)


def _create(http: httpx.Client, spec: dict[str, Any] | str) -> httpx.Response:
    text = spec if isinstance(spec, str) else json.dumps({"spec": spec})
    return http.post("/v1/jobs", content=text.encode(), headers={"Content-Type": "application/json"})


def test_specs_with_huge_numbers_are_refused(inputs_stack: Stack, store: Path) -> None:
    s = inputs_stack
    mp = '{"spec": {"kind": "mixed_precision", "model": {"zoo": "digits-cnn"}, '
    nested: Any = 10**30
    for _ in range(10):
        nested = [nested]
    cases: list[tuple[dict[str, Any] | str, str]] = [
        ({"kind": "benchmark", "model": {"zoo": "digits-cnn"}, "repeats": 10**30}, "repeats"),
        ({"kind": "mixed_precision", "model": {"zoo": "digits-cnn"}, "eval_samples": 2**70},
         "eval_samples"),
        ({"kind": "mixed_precision", "model": {"zoo": "digits-cnn"}, "budget": {"value": 1e308}},
         "budget"),
        (mp + '"budget": {"mode": "absolute", "value": NaN}}}', "budget.value"),
        (mp + '"budget": {"value": Infinity}}}', "budget"),
        (mp + '"budget": {"mode": "absolute", "value": -Infinity}}}', "budget.value"),
        (mp + '"budget": {"mode": "absolute", "value": Infinity}}}', "budget.value"),
        ({"kind": "benchmark", "model": {"zoo": "digits-cnn"}, "input_shape": nested},
         "input_shape"),
        ({"kind": "benchmark", "model": {"zoo": "digits-cnn"}, "batch_size": 1e308}, "batch_size"),
    ]
    with _http(s, s.key()) as http:
        for spec, field in cases:
            _refused(_create(http, spec), {422}, field)
        # an integer too long for Python to parse (over 4300 digits) is refused, not a crash
        r = _create(http, mp + '"repeats": ' + "9" * 5000 + "}}")
        answers.append(r.status_code)
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
        _nothing_left(s, http, store)


def test_the_same_routes_accept_valid_input(inputs_stack: Stack, store: Path,
                                            tmp_path: Path) -> None:
    """The control: a valid upload and job on the same routes succeed, so the empty lists and
    the empty store above are the refusals' doing, not a route that stores nothing."""
    s = inputs_stack
    assert [p for p in store.rglob("*") if p.is_file()] == []  # after every hostile request
    with _http(s, s.key()) as http:
        r = http.post("/v1/models", params={"name": "tiny"},
                      content=export_tiny(tmp_path / "tiny.pt2").read_bytes(),
                      headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        spec = BenchmarkSpec(model=ModelRef(id=r.json()["id"]), repeats=2, warmup=0,
                             per_layer=False)
        created = _create(http, spec.model_dump(mode="json"))
        assert created.status_code == 201, created.text
        assert [m["name"] for m in http.get("/v1/models").json()["items"]] == ["tiny"]
        assert [j["id"] for j in http.get("/v1/jobs").json()["items"]] == [created.json()["id"]]
        http.post(f"/v1/jobs/{created.json()['id']}/cancel", params={"force": "true"})
    assert [p for p in store.rglob("*") if p.is_file()]
    measured.append(f"hostile inputs: {len(answers)} requests, all 4xx "
                    f"({dict(sorted((c, answers.count(c)) for c in set(answers)))}), "
                    "0 partial state (no asset, job, stored object or upload temp file)")
    assert answers and all(400 <= c < 500 for c in answers)
