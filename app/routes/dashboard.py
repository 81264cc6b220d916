"""The job dashboard: server-rendered pages (Jinja2), htmx for small updates, plotly for charts,
live progress from the same SSE stream as the API. Same keys as the API, kept in an HttpOnly,
SameSite=Strict cookie after the login form."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from app import assets, auth, jobs
from app.deps import ServicesDep
from app.errors import ApiError
from app.schemas import DatasetInfo, Job, JobCreate, ModelInfo, ModelRef

COOKIE = "modelpress_key"
HERE = Path(__file__).resolve().parents[1]
templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(include_in_schema=False)

KINDS = ["mixed_precision", "sensitivity", "benchmark", "loss_benchmark", "intrinsic_dimension",
         "spiking", "few_step_distill"]
STATES = ["queued", "running", "succeeded", "failed", "cancelled"]
ZOO = ["digits-cnn", "minilm-l6", "char-gpt"]
BUILTIN_DATA = ["digits-test", "digits-calib", "sentences"]


class LoginRequired(Exception):
    pass


async def _who(request: Request, svc: ServicesDep) -> auth.Principal:
    token = request.cookies.get(COOKIE)
    who = await auth.authenticate(svc.redis, token) if token else None
    if who is None:
        raise LoginRequired
    return who


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
    return _page(request, "login.html", error=error)


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
    models = await assets.list_assets(svc, "models", tenant, ModelInfo, 200)
    data = await assets.list_assets(svc, "datasets", tenant, DatasetInfo, 200)
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
    deleted: Annotated[str | None, Query(pattern=r"^job_[0-9a-f]{32}$")] = None,
    error: str = "",
) -> HTMLResponse:
    who = await _who(request, svc)
    page = await jobs.list_jobs(svc, who.tenant, 100, None, state or None, kind or None)
    models, data = await _assets(svc, who.tenant)
    prefill = ""
    if again:
        src = await jobs.get_job(svc, who.tenant, again)
        prefill = json.dumps(src.spec.model_dump(mode="json", exclude_none=True), indent=2)
    return _page(request, "jobs.html", jobs=page.items, state=state or "", kind=kind or "",
                 kinds=KINDS, states=STATES, zoo=ZOO, builtin=BUILTIN_DATA, models=models,
                 datasets=data, prefill=prefill, error=error, summary=_summary,
                 model_label=_model_label, tenant=who.tenant, deleted=deleted)


@router.post("/ui/jobs")
async def submit(
    request: Request, svc: ServicesDep,
    kind: Annotated[str, Form()] = "mixed_precision",
    model: Annotated[str, Form()] = "zoo:digits-cnn",
    dataset: Annotated[str, Form()] = "",
    budget: Annotated[float, Form()] = 0.999,
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
                spec["budget"] = {"mode": "relative", "value": budget}
        body = JobCreate.model_validate({"spec": spec, "name": name or None})
    except (ValueError, ValidationError) as exc:
        msg = (exc.errors()[0]["msg"] + " at " + ".".join(str(p) for p in exc.errors()[0]["loc"])
               if isinstance(exc, ValidationError) else f"the spec is not JSON: {exc}")
        page = await jobs_page(request, svc, error=f"Could not submit: {msg}")
        page.status_code = 422
        return page
    job, _ = await jobs.create_job(svc, who.tenant, body)
    return RedirectResponse(f"/ui/jobs/{job.id}", status_code=303)


@router.get("/ui/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: str, svc: ServicesDep) -> HTMLResponse:
    who = await _who(request, svc)
    try:
        job = await jobs.get_job(svc, who.tenant, job_id)
    except ApiError as exc:
        if exc.status != 404:
            raise
        # Another tenant's job looks exactly like one that does not exist.
        return _page(request, "404.html", status=404, what=f"job {job_id}")
    return _page(request, "job.html", job=job, tenant=who.tenant)


@router.get("/ui/jobs/{job_id}/result", response_class=HTMLResponse)
async def job_result(request: Request, job_id: str, svc: ServicesDep) -> HTMLResponse:
    who = await _who(request, svc)
    job = await jobs.get_job(svc, who.tenant, job_id)
    return _page(request, "_result.html", job=job)


@router.get("/ui/jobs/{job_id}/log", response_class=HTMLResponse)
async def job_log(request: Request, job_id: str, svc: ServicesDep) -> HTMLResponse:
    who = await _who(request, svc)
    lines = await jobs.log_lines(svc, who.tenant, job_id, 40)
    return _page(request, "_log.html", lines=lines)


@router.post("/ui/jobs/{job_id}/cancel", response_class=HTMLResponse)
async def cancel(request: Request, job_id: str, svc: ServicesDep) -> HTMLResponse:
    who = await _who(request, svc)
    job = await jobs.cancel_job(svc, who.tenant, job_id, False)
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
            return HTMLResponse(html.escape(exc.message), status_code=404,
                                headers={"HX-Redirect": "/ui/jobs"})
        # 409 (not finished), 5xx (the store): shown beside the button, which stays for a retry
        return HTMLResponse(html.escape(exc.message))
    # htmx follows HX-Redirect with a full page load
    return Response(status_code=204, headers={"HX-Redirect": f"/ui/jobs?deleted={job_id}"})


def install(app: Any) -> None:
    """Routes, plus HTML answers (login redirect, 404 page) for the dashboard's paths."""
    app.include_router(router)

    @app.exception_handler(LoginRequired)
    async def _login(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse("/ui/login", status_code=303)
