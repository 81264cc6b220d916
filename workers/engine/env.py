"""Where a figure was measured: device, threads, library versions, host."""

from __future__ import annotations

import platform
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import torch

from app.schemas import Environment

_VERSIONED = ("modelpress", "torch", "onnxruntime", "onnx", "numpy", "transformers", "triton")


@lru_cache(maxsize=1)
def needs_reduce_range() -> bool:
    """True on x86 CPUs without VNNI, where u8 x s8 int8 GEMMs (ORT's, oneDNN's) can saturate
    (see quant.formats). Cached: asked for every layer and every realized config, and the CPU
    does not change."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return not any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        from workers.engine.context import UserError

        raise UserError("the job asked for device `cuda`, but this worker has no GPU")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in _VERSIONED:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


def environment(device: torch.device) -> Environment:
    return Environment(device=str(device), device_name=device_name(device),
                       threads=torch.get_num_threads(),
                       versions=versions(), host=platform.node())
