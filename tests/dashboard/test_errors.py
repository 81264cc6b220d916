"""The dashboard answers every failure with HTML the browser shows (a page, or a fragment htmx
swaps), never the API's JSON: htmx swaps no 4xx answer, so JSON there meant a click that did
nothing. Against a real API process and Redis; no worker (jobs stay queued)."""

from __future__ import annotations

import httpx

from app import records
from app.routes.dashboard import COOKIE
from app.schemas import BenchmarkSpec, ModelRef
from tests.conftest import Stack

MISSING_JOB = "job_" + "0" * 32
HX = {"HX-Request": "true"}


def ui(stack: Stack, key: str) -> httpx.Client:
    return httpx.Client(base_url=stack.base_url, cookies={COOKIE: key}, timeout=30)


def html(r: httpx.Response) -> str:
    assert r.headers["content-type"].startswith("text/html"), (r.status_code, r.text[:300])
    return r.text


def queued_job(stack: Stack, key: str) -> str:
    with stack.client(key) as client:
        return client.jobs.create(BenchmarkSpec(model=ModelRef(zoo="digits-cnn"))).id


def test_a_deeply_nested_spec_is_a_form_error(ui_stack: Stack) -> None:
    with ui(ui_stack, ui_stack.key()) as c:
        r = c.post("/ui/jobs", data={"spec_json": "[" * 50_000})
    assert r.status_code == 422
    assert 'id="submit-error"' in html(r) and "nested too deeply" in r.text


def test_an_unknown_model_is_a_form_error(ui_stack: Stack) -> None:
    with ui(ui_stack, ui_stack.key()) as c:
        r = c.post("/ui/jobs", data={"kind": "benchmark", "model": "mdl_" + "0" * 32})
    assert r.status_code == 404
    assert 'id="submit-error"' in html(r) and "not found" in r.text


def test_the_budget_is_checked_by_the_form(ui_stack: Stack) -> None:
    with ui(ui_stack, ui_stack.key()) as c:
        r = c.post("/ui/jobs", data={"kind": "mixed_precision", "budget": "abc"})
        assert r.status_code == 422
        assert 'id="submit-error"' in html(r) and "budget must be a number" in r.text
        r = c.post("/ui/jobs", data={"kind": "mixed_precision", "budget": "1.5"})
        assert r.status_code == 422 and "relative budget is a fraction" in html(r)
        # a kind without a budget ignores the field
        r = c.post("/ui/jobs", data={"kind": "benchmark", "budget": "abc"})
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/jobs/job_")


def test_form_errors_name_the_field_as_the_json_does(ui_stack: Stack) -> None:
    spec = '{"kind": "benchmark", "model": {"zoo": "digits-cnn"}, "batch_size": 0}'
    with ui(ui_stack, ui_stack.key()) as c:
        r = c.post("/ui/jobs", data={"spec_json": spec})
    assert r.status_code == 422
    assert "at spec.batch_size" in html(r) and "spec.benchmark" not in r.text
    assert "&#34;batch_size&#34;: 0" in r.text  # the JSON typed is kept in the form


def test_run_again_from_a_job_that_is_not_yours(ui_stack: Stack) -> None:
    others = queued_job(ui_stack, ui_stack.key())
    with ui(ui_stack, ui_stack.key()) as c:
        for job_id in (others, MISSING_JOB, "Your key expired"):
            r = c.get("/ui/jobs", params={"from": job_id})
            assert r.status_code == 404
            assert 'id="submit-error"' in html(r) and "was not found" in r.text
            assert job_id not in r.text  # no text from the URL on the page
        r = c.get("/ui/jobs", params={"deleted": "x"})
    assert r.status_code == 200 and 'id="deleted-notice"' not in html(r)


def test_fragments_of_an_unknown_job(ui_stack: Stack) -> None:
    with ui(ui_stack, ui_stack.key()) as c:
        # htmx swaps 2xx only; 286 also stops the log's polling (the job will not come back)
        r = c.get(f"/ui/jobs/{MISSING_JOB}/log", headers=HX)
        assert r.status_code == 286 and 'id="log"' in html(r) and "not found" in r.text
        r = c.get(f"/ui/jobs/{MISSING_JOB}/result", headers=HX)
        assert r.status_code == 200 and 'id="result-error"' in html(r) and "not found" in r.text
        # outside htmx, the true status
        assert c.get(f"/ui/jobs/{MISSING_JOB}/log").status_code == 404
        r = c.get(f"/ui/jobs/{MISSING_JOB}/result")
        assert r.status_code == 404 and "not found" in html(r)
        r = c.post(f"/ui/jobs/{MISSING_JOB}/cancel", headers=HX)
        assert r.headers["HX-Redirect"] == "/ui/jobs" and "not found" in html(r)


def test_cancel_a_job_that_has_finished(ui_stack: Stack) -> None:
    key = ui_stack.key()
    job_id = queued_job(ui_stack, key)
    # no worker here: finish it as one would, before the page's Cancel click arrives
    ui_stack.redis.hset(records.job_key(job_id), "state", "succeeded")
    with ui(ui_stack, key) as c:
        r = c.post(f"/ui/jobs/{job_id}/cancel", headers=HX)
    assert r.status_code == 200
    assert 'id="cancel-status"' in html(r) and "already succeeded" in r.text


def test_messages_come_from_codes_not_from_the_url(ui_stack: Stack) -> None:
    spoof = "Your key expired, log in at http://evil.example"
    r = httpx.get(f"{ui_stack.base_url}/ui/login", params={"error": spoof})
    assert r.status_code == 200 and "evil.example" not in html(r)
    assert 'id="login-error"' not in r.text
    with ui(ui_stack, ui_stack.key()) as c:
        r = c.get("/ui/jobs", params={"error": spoof})
        assert r.status_code == 200 and "evil.example" not in html(r)
    # a saved key that stopped working sends the user to log in, with a fixed message
    with ui(ui_stack, "mp_revoked") as c:
        r = c.get("/ui/jobs")
        assert r.status_code == 303 and r.headers["location"] == "/ui/login?error=key_invalid"
        r = c.get(r.headers["location"])
    assert 'id="login-error"' in html(r) and "no longer valid" in r.text
    # htmx (a polled fragment) is sent to the login page whole, not given it to swap in
    with ui(ui_stack, "mp_revoked") as c:
        r = c.get(f"/ui/jobs/{MISSING_JOB}/log", headers=HX)
    assert r.status_code == 200 and r.headers["HX-Redirect"] == "/ui/login?error=key_invalid"


def test_fragments_do_not_echo_a_path_that_is_no_job_id(ui_stack: Stack) -> None:
    spoof = "Your key expired, log in at evil.example"
    with ui(ui_stack, ui_stack.key()) as c:
        for r in (c.get(f"/ui/jobs/{spoof}/log", headers=HX),
                  c.get(f"/ui/jobs/{spoof}/result", headers=HX),
                  c.post(f"/ui/jobs/{spoof}/cancel", headers=HX),
                  c.post(f"/ui/jobs/{spoof}/delete", headers=HX)):
            assert "evil.example" not in html(r) and "no such job" in r.text, r.text
