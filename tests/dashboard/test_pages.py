"""The dashboard's pages render for a job of every kind (the browser test covers a few kinds
end to end; a kind whose spec has no model once broke the whole jobs list)."""

from __future__ import annotations

import math
import re
from typing import Any, get_args

import pytest
from starlette.requests import Request

from app import records
from app.routes import dashboard
from app.schemas import (
    ErrorInfo,
    IntrinsicDimensionResult,
    Job,
    JobCreate,
    JobKind,
    MixedPrecisionResult,
    Progress,
)

KINDS = list(get_args(JobKind))


def _job(kind: str, state: str) -> Job:
    spec: dict[str, Any] = {"kind": kind}
    if kind in ("benchmark", "sensitivity", "mixed_precision"):
        spec["model"] = {"zoo": "digits-cnn"}
    now = records.now()
    return Job(id="job_" + f"{KINDS.index(kind):032x}", kind=kind, state=state,  # type: ignore[arg-type]
               spec=JobCreate.model_validate({"spec": spec}).spec, queue="cpu", created_at=now,
               started_at=now if state != "queued" else None,
               finished_at=now if state == "failed" else None,
               progress=Progress(stage="queued", message="waiting", updated_at=now),
               error=ErrorInfo(type="x", message="it failed") if state == "failed" else None)


def _render(name: str, **ctx: Any) -> str:
    request = Request({"type": "http", "method": "GET", "path": "/ui/jobs", "headers": [],
                       "query_string": b""})
    return bytes(dashboard._page(request, name, **ctx).body).decode()


def test_dashboard_knows_every_kind() -> None:
    assert sorted(dashboard.KINDS) == sorted(KINDS)


@pytest.mark.parametrize("state", ["queued", "running", "failed"])
def test_the_jobs_list_renders_every_kind(state: str) -> None:
    jobs = [_job(k, state) for k in KINDS]
    page = _render("jobs.html", jobs=jobs, state="", kind="", kinds=dashboard.KINDS,
                   states=dashboard.STATES, zoo=dashboard.ZOO, builtin=dashboard.BUILTIN_DATA,
                   models=[], datasets=[], prefill="", error="", summary=dashboard._summary,
                   model_label=dashboard._model_label, tenant="t", deleted=None)
    for job in jobs:
        assert f'href="/ui/jobs/{job.id}"' in page
    assert "zoo:digits-cnn" in page and "digits diffusion teacher" in page
    assert "linear head + cross-entropy" in page and "char-gpt" in page
    assert 'id="partial"' not in page


@pytest.mark.parametrize("jobs", [[], [_job("benchmark", "failed")]])
def test_a_filtered_list_cut_short_says_so(jobs: list[Job]) -> None:
    page = _render("jobs.html", jobs=jobs, partial=True, scan_limit=1000, state="failed",
                   kind="", kinds=dashboard.KINDS, states=dashboard.STATES, zoo=dashboard.ZOO,
                   builtin=dashboard.BUILTIN_DATA, models=[], datasets=[], prefill="", error="",
                   summary=dashboard._summary, model_label=dashboard._model_label, tenant="t",
                   deleted=None)
    assert "Only the newest 1000 jobs were searched" in page and "jobs list --all" in page
    assert 'id="empty"' not in page  # not "no jobs match": older ones may


@pytest.mark.parametrize("kind", KINDS)
def test_a_job_page_renders_for_every_kind(kind: str) -> None:
    for state in ("queued", "failed"):
        page = _render("job.html", job=_job(kind, state), tenant="t")
        assert kind in page and 'id="state"' in page


ENV = {"device": "cpu", "device_name": "cpu", "threads": 1, "versions": {}, "host": "h"}


def _point(label: str, metric: float, ms: float) -> dict[str, Any]:
    return {"label": label, "config": {}, "deployed_metric": metric, "latency_ms": ms,
            "size_bytes": 1000, "pareto": True}


def _scripts(page: str) -> str:
    return "\n".join(re.findall(r"<script>(.*?)</script>", page, re.S))


@pytest.mark.parametrize("odd", [math.nan, math.inf, -math.inf])
def test_result_charts_take_figures_that_are_not_finite(odd: float) -> None:
    """A budget threshold or accuracy target that came out NaN or infinite (a user's model whose
    perplexity overflows) is written into the chart's script as a JavaScript value: Python's
    `nan` / `inf` there were undefined names, and the script stopped before drawing a chart."""
    mp = MixedPrecisionResult.model_validate({
        "model": "m", "backend": "onnxruntime-cpu", "metric": "perplexity",
        "higher_is_better": False, "budget": {}, "threshold": odd,
        "baseline": _point("fp32", odd, 2.0), "chosen": _point("fp32", odd, 2.0), "why": "w",
        "frontier": [_point("fp32", odd, 2.0)], "searches": [], "sensitivity": [],
        "evaluations": 1, "stage_seconds": {}, "latency_reduction": 0.0, "method": "m",
        "environment": ENV})
    dim = IntrinsicDimensionResult.model_validate({
        "model": "digits-mlp", "projection": "dense", "parameters": 10, "full_accuracy": odd,
        "target": odd, "d_int90": None, "d_int90_per_seed": [None],
        "curve": [{"d": 1, "seed": 0, "accuracy": 0.5}], "training_runs": 1, "seconds": 1.0,
        "method": "m", "environment": ENV})
    for kind, res in (("mixed_precision", mp), ("intrinsic_dimension", dim)):
        job = _job(kind, "succeeded").model_copy(update={"result": res})
        script = _scripts(_render("_result.html", job=job))
        assert "Plotly.newPlot" in script
        assert not re.search(r"(?<![\w\"])-?(nan|inf)(?![\w\"])", script), script
        js = {math.inf: "Infinity", -math.inf: "-Infinity"}.get(odd, "NaN")
        assert f"[{js}, {js}]" in script
