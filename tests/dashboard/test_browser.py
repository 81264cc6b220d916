"""The dashboard in a real headless Chromium (Debian's) against the running service."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.schemas import BenchmarkSpec, MixedPrecisionResult, ModelRef, SpikingResult
from modelpress import NotFoundError
from tests.conftest import Stack

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[1] / "_artifacts"

if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def login(browser: object, stack: Stack, key: str) -> object:
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)  # type: ignore[attr-defined]
    page.goto(f"{stack.base_url}/ui/jobs")
    assert page.url.endswith("/ui/login")
    page.fill("#key", "mp_wrong")
    page.click("input[type=submit]")
    sync_api.expect(page.locator("#login-error")).to_be_visible()
    page.fill("#key", key)
    page.click("input[type=submit]")
    page.wait_for_url("**/ui/jobs")
    return page


def test_submit_watch_plot_download(browser: object, stack: Stack, tmp_path: Path) -> None:
    key = stack.key()
    page = login(browser, stack, key)
    sync_api.expect(page.locator("#empty")).to_be_visible()  # type: ignore[attr-defined]
    # Submit through the form: the defaults are the main job on digits-cnn.
    page.select_option("#kind", "mixed_precision")  # type: ignore[attr-defined]
    page.select_option("#model", "zoo:digits-cnn")  # type: ignore[attr-defined]
    page.fill("#name", "from the browser")  # type: ignore[attr-defined]
    page.click("#submit-button")  # type: ignore[attr-defined]
    page.wait_for_url("**/ui/jobs/job_*")  # type: ignore[attr-defined]
    job_id = page.url.rsplit("/", 1)[1]  # type: ignore[attr-defined]
    loaded_at = page.evaluate("window.pageLoadedAt")  # type: ignore[attr-defined]
    widths: list[float] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        # State first, then width: the page's state handler sets both at once, so a width read after
        # seeing "succeeded" is the final one (read the other way round, the last width could be missed).
        done = page.locator("#state").inner_text() == "succeeded"  # type: ignore[attr-defined]
        w = page.evaluate("parseFloat(document.getElementById('progress').style.width)")  # type: ignore[attr-defined]
        if not widths or w != widths[-1]:
            widths.append(w)
        if done:
            break
        time.sleep(0.1)
    assert page.locator("#state").inner_text() == "succeeded"  # type: ignore[attr-defined]
    assert len(widths) >= 3 and widths == sorted(widths) and widths[-1] == 100.0, widths
    assert page.evaluate("window.pageLoadedAt") == loaded_at  # type: ignore[attr-defined]  # no reload

    # The result fragment arrives by itself; the plot has one marker per measured config.
    page.wait_for_selector("#pareto .main-svg")  # type: ignore[attr-defined]
    with stack.client(key) as client:
        res = client.jobs.get(job_id).result
    assert isinstance(res, MixedPrecisionResult)
    n_points = page.evaluate("document.getElementById('pareto').data[0].x.length")  # type: ignore[attr-defined]
    assert n_points == len(res.frontier)
    n_front = page.evaluate("document.getElementById('pareto').data[1].x.length")  # type: ignore[attr-defined]
    assert n_front == sum(p.pareto for p in res.frontier)
    assert page.locator("#config tr").count() == len(res.sensitivity) + 1  # type: ignore[attr-defined]
    # digits-cnn with labels: the cross-entropy's Tr(H) by double backward, and the page says so.
    assert res.hessian == "double-backward"
    sync_api.expect(page.locator("#result")).to_contain_text(  # type: ignore[attr-defined]
        "Tr(H) by double-backward")
    # Who computed the evaluations: one worker here, the job's own.
    (who, n), = res.computed_by.items()
    assert n == res.evaluations
    sync_api.expect(page.locator("#computed-by")).to_have_text(  # type: ignore[attr-defined]
        f"{res.evaluations} evaluations, computed by {who} {n}.")
    page.wait_for_selector("#sensitivity .main-svg")  # type: ignore[attr-defined]
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "dashboard-job-mixed-precision.png"), full_page=True)  # type: ignore[attr-defined]

    with page.expect_download() as dl:  # type: ignore[attr-defined]
        page.click("#artifacts a:text('report.json')")  # type: ignore[attr-defined]
    got = Path(dl.value.path()).read_bytes()
    assert MixedPrecisionResult.model_validate_json(got) == res

    page.goto(f"{stack.base_url}/ui/jobs")  # type: ignore[attr-defined]
    row = page.locator(f"tr[data-job='{job_id}']")  # type: ignore[attr-defined]
    sync_api.expect(row).to_contain_text("succeeded")
    page.screenshot(path=str(SHOTS / "dashboard-jobs.png"), full_page=True)  # type: ignore[attr-defined]

    # "Run again with changes" pre-fills the form with this job's spec.
    page.goto(f"{stack.base_url}/ui/jobs?from={job_id}")  # type: ignore[attr-defined]
    assert '"kind": "mixed_precision"' in page.input_value("#spec_json")  # type: ignore[attr-defined]


def test_spiking_job_from_the_form(browser: object, stack: Stack) -> None:
    key = stack.key()
    page = login(browser, stack, key)
    page.select_option("#kind", "spiking")  # type: ignore[attr-defined]
    page.click("#submit-button")  # type: ignore[attr-defined]
    page.wait_for_url("**/ui/jobs/job_*")  # type: ignore[attr-defined]
    job_id = page.url.rsplit("/", 1)[1]  # type: ignore[attr-defined]
    sync_api.expect(page.locator("#state")).to_have_text("succeeded", timeout=180_000)  # type: ignore[attr-defined]
    page.wait_for_selector("#spiking-layers")  # type: ignore[attr-defined]
    with stack.client(key) as client:
        res = client.jobs.get(job_id).result
    assert isinstance(res, SpikingResult) and res.model == "digits-cnn"
    assert page.locator("#spiking-layers tr").count() == len(res.layers) + 1  # type: ignore[attr-defined]
    sync_api.expect(page.locator("#summary")).to_contain_text("estimate, not a measurement")
    sync_api.expect(page.locator("#environment")).to_contain_text(  # type: ignore[attr-defined]
        f"Ran on {res.environment.device_name} ({res.environment.device},")
    page.screenshot(path=str(SHOTS / "dashboard-job-spiking.png"), full_page=True)  # type: ignore[attr-defined]


def test_cancel_from_the_page(browser: object, stack: Stack) -> None:
    key = stack.key()
    with stack.client(key) as client:
        job = client.jobs.create(BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), repeats=5,
                                               min_time_s=120, per_layer=False))
    page = login(browser, stack, key)
    page.on("dialog", lambda d: d.accept())  # type: ignore[attr-defined]
    page.goto(f"{stack.base_url}/ui/jobs/{job.id}")  # type: ignore[attr-defined]
    sync_api.expect(page.locator("#state")).to_have_text("running", timeout=60_000)  # type: ignore[attr-defined]
    page.click("#cancel")  # type: ignore[attr-defined]
    sync_api.expect(page.locator("#state")).to_have_text("cancelled", timeout=30_000)  # type: ignore[attr-defined]
    sync_api.expect(page.locator("#cancelled")).to_be_visible(timeout=10_000)  # type: ignore[attr-defined]
    # Finished, it can be deleted from the same page (the button appears without a reload).
    page.click("#delete")  # type: ignore[attr-defined]
    page.wait_for_url(f"**/ui/jobs?deleted={job.id}")  # type: ignore[attr-defined]
    sync_api.expect(page.locator("#deleted-notice")).to_contain_text(job.id)  # type: ignore[attr-defined]
    assert f'href="/ui/jobs/{job.id}"' not in page.content()  # type: ignore[attr-defined]
    with stack.client(key) as client, pytest.raises(NotFoundError):
        client.jobs.get(job.id)


def test_other_tenants_job_is_a_404_page(browser: object, stack: Stack) -> None:
    with stack.client() as other:
        theirs = other.jobs.create(BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), repeats=1,
                                                 per_layer=False))
    page = login(browser, stack, stack.key())
    resp = page.goto(f"{stack.base_url}/ui/jobs/{theirs.id}")  # type: ignore[attr-defined]
    assert resp.status == 404
    sync_api.expect(page.locator("#not-found")).to_be_visible()  # type: ignore[attr-defined]
