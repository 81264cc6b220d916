"""The wheel a user installs: the SDK's types are visible to their type checker (PEP 561
markers, for ``modelpress`` and for ``app``, whose schemas are the SDK's models), and the files
the service reads at run time travel with the code."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_type_markers_templates_and_data(tmp_path: Path) -> None:
    # built from a copy: setuptools would reuse (and leave) a build/ folder in the checkout
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in ("app", "workers", "gpu_kernels", "modelpress"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("modelpress-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"modelpress/py.typed", "app/py.typed"} <= names
    assert {"app/templates/jobs.html", "workers/engine/data/corpus.txt"} <= names
    assert any(n.startswith("app/static/htmx-") for n in names)
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "modelpress = modelpress.cli:run" in zipfile.ZipFile(wheel).read(entry).decode()
