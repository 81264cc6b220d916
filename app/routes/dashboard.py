"""The job dashboard: server-rendered pages (Jinja2), htmx for small updates, plotly for charts,
live progress from the same SSE stream as the API. Same keys as the API, kept in an HttpOnly,
SameSite=Strict cookie after the login form."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from redis import ConnectionError as RedisConnectionError
from redis import TimeoutError as RedisTimeoutError

from app import assets, auth, jobs
from app.deps import ServicesDep, check_rate_limit
from app.errors import (
    REDIS_DOWN,
    REDIS_RETRY_S,
    ApiError,
    field_path,
    log_redis_down,
    redis_down,
)
from app.schemas import JOB_LIST_SCAN_LIMIT, DatasetInfo, Job, JobCreate, ModelInfo, ModelRef

COOKIE = "modelpress_key"
HERE = Path(__file__).resolve().parents[1]
templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(include_in_schema=False)

KINDS = ["mixed_precision", "sensitivity", "benchmark", "loss_benchmark", "intrinsic_dimension",
         "spiking", "few_step_distill"]
STATES = ["queued", "running", "succeeded", "failed", "cancelled"]
ZOO = ["digits-cnn", "minilm-l6", "char-gpt"]
BUILTIN_DATA = ["digits-test", "digits-calib", "sentences"]
JOB_ID = re.compile(r"job_[0-9a-f]{32}")

# What /ui/login?error=CODE shows. Only these fixed texts: a message taken from the URL would let
# anyone link to the real login page saying whatever they like ("log in at http://evil...").
LOGIN_MESSAGES = {
    "key_invalid": "The key this browser saved is no longer valid (revoked, or the service's "
                   "data was reset). Paste a current key.",
}


class LoginRequired(Exception):
    def __init__(self, code: str = "") -> None:
        super().__init__(code)
        self.code = code  # a LOGIN_MESSAGES key, or "" for none


class RateLimited(Exception):
    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


async def _who(request: Request, svc: ServicesDep, counted: bool = True) -> auth.Principal:
    """The cookie's key, counted against its per-minute limit like an API call when ``counted``.

    Page loads and the user's posts (submit, cancel, delete) count; the fragments the job page
    fetches by itself (the log every 2 s while the job runs, the result once) do not: an open
    tab would otherwise spend 30 requests a minute of the key's budget with nobody at it, and
    lock its owner's API clients out. They are small reads of one job. The page's SSE stream and
    artifact downloads go to /v1 and count there."""
    token = request.cookies.get(COOKIE)
    who = await auth.authenticate(svc.redis, token) if token else None
    if who is None:
        raise LoginRequired("key_invalid" if token else "")
    if counted:
        try:
            await check_rate_limit(svc, who)
        except ApiError as exc:
            raise RateLimited(exc) from None
    return who


def _htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def _said(exc: ApiError, job_id: str) -> str:
    """An error's message for a page about ``job_id``: a path that is no job id gets a fixed
    text, so a link cannot make the page say what it likes (it can only be a 404)."""
    return exc.message if JOB_ID.fullmatch(job_id) else "no such job"


def _fragment(request: Request, body: str, status: int, htmx_status: int = 200) -> HTMLResponse:
    """An error shown in place of a fragment. htmx 2 swaps no 4xx/5xx answer (the click would
    seem to do nothing), so htmx gets ``htmx_status``; other callers the true status."""
    return HTMLResponse(body, status_code=htmx_status if _htmx(request) else status)


def _page(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, ctx, status_code=status)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=303)


@router.get("/ui/static/plotly.min.js")
async def plotly_js() -> FileResponse:
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    return FileResponse(path, media_type="text/javascript",
                        headers={"Cache-Control": "public, max-age=86400"})


@router.get("/ui/static/{name}")
async def static(name: str) -> FileResponse:
    path = (HERE / "static" / name).resolve()
    if path.parent != (HERE / "static").resolve() or not path.is_file():
        raise ApiError(404, f"no static file {name!r}", "not_found")
    return FileResponse(path, headers={"Cache-Control": "public, max-age=86400"})


@router.get("/ui/login", response_class=HTMLResponse)
async def login_form(request: Request, error: str = "") -> HTMLResponse:
    return _page(request, "login.html", error=LOGIN_MESSAGES.get(error, ""))


@router.post("/ui/login")
async def login(request: Request, svc: ServicesDep, key: Annotated[str, Form()]) -> Response:
    who = await auth.authenticate(svc.redis, key.strip())
    if who is None:
        return _page(request, "login.html", status=401,
                     error="That key is not valid. Keys start with mp_; `modelpress serve` "
                           "prints one, `modelpress keys create` makes more.")
    resp = RedirectResponse("/ui/jobs", status_code=303)
    resp.set_cookie(COOKIE, key.strip(), httponly=True, samesite="strict", max_age=30 * 86400)
    return resp


@router.post("/ui/logout")
async def logout() -> Response:
    resp = RedirectResponse("/ui/login", status_code=303)
    resp.delete_cookie(COOKIE)
    return resp


async def _assets(svc: ServicesDep, tenant: str) -> tuple[list[ModelInfo], list[DatasetInfo]]:
    models, _ = await assets.list_assets(svc, "models", tenant, ModelInfo, 200)
    data, _ = await assets.list_assets(svc, "datasets", tenant, DatasetInfo, 200)
    return models, data


def _model_label(job: Job) -> str:
    """The Model column: the spec's model, or what a kind without one works on."""
    model = getattr(job.spec, "model", None)
    if model is None:
        return {"few_step_distill": "digits diffusion teacher",
                "loss_benchmark": "linear head + cross-entropy"}.get(job.kind, "")
    return model.label() if isinstance(model, ModelRef) else str(model)


def _summary(job: Job) -> str:
    res = job.result
    if res is None:
        return job.error.message[:80] if job.error else ""
    if res.kind == "mixed_precision":
        c = res.chosen
        return (f"{res.metric} {c.deployed_metric:.4f}, {res.latency_reduction:.1%} faster, "
                f"{len(c.config)} layers quantized")
    if res.kind == "benchmark":
        return f"median {res.latency.median_ms:.3f} ms"
    if res.kind == "sensitivity":
        return f"{len(res.layers)} layers scored"
    if res.kind == "intrinsic_dimension":
        return f"d_int90 {res.d_int90} of D {res.parameters:,}"
    if res.kind == "few_step_distill":
        return res.summary[:120]
    if res.kind == "spiking":
        return (f"{res.metric} {res.spiking_quality:.4f} vs twin {res.twin_quality:.4f}, "
                f"{res.energy_ratio:.1f}x less energy (est.)")
    return f"{len(res.rows)} cases"


@router.get("/ui/jobs", response_class=HTMLResponse)
async def jobs_page(
    request: Request, svc: ServicesDep,
    state: Annotated[str | None, Query()] = None,
    kind: Annotated[str | None, Query()] = None,
    again: Annotated[str | None, Query(alias="from")] = None,
    deleted: Annotated[str | None, Query()] = None,
) -> HTMLResponse:
    who = await _who(request, svc)
    prefill, error, status = "", "", 200
    if again:
        try:
            src = await jobs.get_job(svc, who.tenant, again)
        except ApiError as exc:
            if exc.status != 404:
                raise
            # not the id from the URL in the message: it is text anyone could put in a link
            error, status = "The job to run again was not found (deleted, or not yours).", 404
        else:
            prefill = json.dumps(src.spec.model_dump(mode="json", exclude_none=True), indent=2)
    # the notice after a delete; anything but a job id (a hand-edited link) is ignored
    notice = deleted if deleted and JOB_ID.fullmatch(deleted) else None
    return await _jobs_view(request, svc, who, state=state, kind=kind, prefill=prefill,
                            deleted=notice, error=error, status=status)


async def _jobs_view(request: Request, svc: ServicesDep, who: auth.Principal, *,
                     state: str | None = None, kind: str | None = None, prefill: str = "",
                     deleted: str | None = None, error: str = "", status: int = 200
                     ) -> HTMLResponse:
    page = await jobs.list_jobs(svc, who.tenant, 100, None, state or None, kind or None)
    models, data = await _assets(svc, who.tenant)
    return _page(request, "jobs.html", status=status, jobs=page.items, partial=page.partial,
                 scan_limit=JOB_LIST_SCAN_LIMIT, state=state or "",
                 kind=kind or "", kinds=KINDS, states=STATES, zoo=ZOO, builtin=BUILTIN_DATA,
                 models=models, datasets=data, prefill=prefill, error=error, summary=_summary,
                 model_label=_model_label, tenant=who.tenant, deleted=deleted)


class _FormError(Exception):
    pass


def _budget(text: str) -> float:
    # a str field checked here: a float Form() field answers a typo with the API's 422 JSON
    try:
        return float(text)
    except ValueError:
        raise _FormError("the budget must be a number, e.g. 0.999 to keep 99.9% of the "
                         "baseline's quality") from None


@router.post("/ui/jobs")
async def submit(
    request: Request, svc: ServicesDep,
    kind: Annotated[str, Form()] = "mixed_precision",
    model: Annotated[str, Form()] = "zoo:digits-cnn",
    dataset: Annotated[str, Form()] = "",
    budget: Annotated[str, Form()] = "0.999",
    name: Annotated[str, Form()] = "",
    spec_json: Annotated[str, Form()] = "",
) -> Response:
    who = await _who(request, svc)
    try:
        if spec_json.strip():
            spec: dict[str, Any] = json.loads(spec_json)
        else:
            spec = {"kind": kind}
            # these kinds name their built-in models themselves (the JSON spec picks others)
            if kind not in ("loss_benchmark", "intrinsic_dimension", "spiking", "few_step_distill"):
                spec["model"] = ({"zoo": model[4:]} if model.startswith("zoo:") else {"id": model})
                if dataset:
                    spec["dataset"] = ({"builtin": dataset[8:]} if dataset.startswith("builtin:")
                                       else {"id": dataset})
            if kind == "mixed_precision":
                spec["budget"] = {"mode": "relative", "value": _budget(budget)}
        body = JobCreate.model_validate({"spec": spec, "name": name or None})
    except ValidationError as exc:  # before ValueError, its base class
        first = exc.errors()[0]
        msg, status = f"{first['msg']} at {field_path(first['loc'])}", 422
    except _FormError as exc:
        msg, status = str(exc), 422
    except RecursionError:  # json.loads on deeply nested arrays or objects
        msg, status = "the spec is nested too deeply to be a job spec", 422
    except ValueError as exc:
        msg, status = f"the spec is not JSON: {exc}", 422
    else:
        try:
            job, _ = await jobs.create_job(svc, who.tenant, body)
        except ApiError as exc:  # an uploaded model or dataset that is gone, the queue down, ...
            msg, status = exc.message, exc.status
        else:
            return RedirectResponse(f"/ui/jobs/{job.id}", status_code=303)
    # the form again, with the message and the JSON the user typed (to fix, not retype)
    return await _jobs_view(request, svc, who, prefill=spec_json, error=f"Could not submit: {msg}",
                            status=status)


@router.get("/ui/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: str, svc: ServicesDep) -> HTMLResponse:
    who = await _who(request, svc)
    try:
        job = await jobs.get_job(svc, who.tenant, job_id)
    except ApiError as exc:
        if exc.status != 404:
            raise
        # Another tenant's job looks exactly like one that does not exist. Only an id is
        # echoed: the path is text anyone could put in a link.
        what = f"job {job_id}" if JOB_ID.fullmatch(job_id) else "such job"
        return _page(request, "404.html", status=404, what=what)
    return _page(request, "job.html", job=job, tenant=who.tenant)


@router.get("/ui/jobs/{job_id}/result", response_class=HTMLResponse)
async def job_result(request: Request, job_id: str, svc: ServicesDep) -> HTMLResponse:
    who = await _who(request, svc, counted=False)  # fetched by the page itself (see _who)
    try:
        job = await jobs.get_job(svc, who.tenant, job_id)
    except ApiError as exc:  # deleted from another tab while this page was open
        return _fragment(request, f'<div class="card error" id="result-error">'
                                  f"{html.escape(_said(exc, job_id))}</div>", exc.status)
    return _page(request, "_result.html", job=job)


@router.get("/ui/jobs/{job_id}/log", response_class=HTMLResponse)
async def job_log(request: Request, job_id: str, svc: ServicesDep) -> HTMLResponse:
    who = await _who(request, svc, counted=False)  # polled every 2 s (see _who)
    try:
        lines = await jobs.log_lines(svc, who.tenant, job_id, 40)
    except ApiError as exc:
        # 286: htmx swaps it and stops polling; a job that is gone does not come back
        return _fragment(request, f'<pre class="log" id="log">{html.escape(_said(exc, job_id))}</pre>',
                         exc.status, 286 if exc.status == 404 else 200)
    return _page(request, "_log.html", lines=lines)


@router.post("/ui/jobs/{job_id}/cancel", response_class=HTMLResponse)
async def cancel(request: Request, job_id: str, svc: ServicesDep) -> HTMLResponse:
    who = await _who(request, svc)
    try:
        job = await jobs.cancel_job(svc, who.tenant, job_id, False)
    except ApiError as exc:
        if exc.status == 404:  # deleted from another tab, as in delete: back to the list
            return HTMLResponse(html.escape(_said(exc, job_id)), status_code=404,
                                headers={"HX-Redirect": "/ui/jobs"})
        # 409: it ended before the click arrived (the page's state was behind); the message
        # takes the button's place (200: htmx swaps no 4xx)
        return HTMLResponse(f'<span id="cancel-status">{html.escape(_said(exc, job_id))}</span>')
    msg = ("Cancelled." if job.state == "cancelled" else
           "Cancel requested: the job stops at its next step.")
    return HTMLResponse(f'<span id="cancel-status">{msg}</span>')


@router.post("/ui/jobs/{job_id}/delete")
async def delete(request: Request, job_id: str, svc: ServicesDep) -> Response:
    who = await _who(request, svc)
    try:
        await jobs.delete_job(svc, who.tenant, job_id)
    except ApiError as exc:
        if exc.status == 404:  # gone already (another tab), or never this tenant's: the list
            return HTMLResponse(html.escape(_said(exc, job_id)), status_code=404,
                                headers={"HX-Redirect": "/ui/jobs"})
        # 409 (not finished), 5xx (the store): shown beside the button, which stays for a retry
        return HTMLResponse(html.escape(_said(exc, job_id)))
    # htmx follows HX-Redirect with a full page load
    return Response(status_code=204, headers={"HX-Redirect": f"/ui/jobs?deleted={job_id}"})


def install(app: Any) -> None:
    """Routes, plus HTML answers (login redirect, 404 page, 429 and 503) for the dashboard's
    paths."""
    app.include_router(router)

    async def _store_down(request: Request, exc: Exception) -> Response:
        if not request.url.path.startswith("/ui/"):
            return await redis_down(request, exc)  # the API's JSON answer
        log_redis_down(request, exc)
        headers = {"Retry-After": REDIS_RETRY_S}
        if _htmx(request):  # as for 429: htmx swaps no 5xx, so say it in the flash box
            headers |= {"HX-Retarget": "#flash", "HX-Reswap": "innerHTML"}
            return HTMLResponse(f"{REDIS_DOWN[:1].upper()}{REDIS_DOWN[1:]}.", headers=headers)
        return templates.TemplateResponse(request, "503.html", {}, status_code=503,
                                          headers=headers)

    # replaces errors.install's JSON-only handlers for these two
    app.add_exception_handler(RedisConnectionError, _store_down)
    app.add_exception_handler(RedisTimeoutError, _store_down)

    @app.exception_handler(LoginRequired)
    async def _login(request: Request, exc: LoginRequired) -> Response:
        url = f"/ui/login?error={exc.code}" if exc.code else "/ui/login"
        if _htmx(request):
            # a redirect would be followed inside the XHR and the login page swapped into a
            # fragment's place; HX-Redirect makes htmx load it as the whole page
            return Response(headers={"HX-Redirect": url})
        return RedirectResponse(url, status_code=303)

    @app.exception_handler(RateLimited)
    async def _limited(request: Request, exc: RateLimited) -> Response:
        headers = dict(exc.error.headers or {})
        retry = headers.get("Retry-After", "60")
        message = f"Too many requests for this key ({exc.error.message}). Try again in {retry} s."
        if _htmx(request):
            # htmx swaps no 429: a 200 shown in base.html's flash box instead of the fragment's
            # target, so the clicked button stays for a retry
            headers |= {"HX-Retarget": "#flash", "HX-Reswap": "innerHTML"}
            return HTMLResponse(html.escape(message), headers=headers)
        return templates.TemplateResponse(request, "429.html", {"message": message},
                                          status_code=429, headers=headers)
