"""Where a figure was measured: device, threads, library versions, host."""

from __future__ import annotations

import ctypes
import os
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


# glibc's mallopt parameters (malloc.h) and the values the workers run with. 32 MiB is the
# largest mmap threshold glibc accepts on 64-bit; fixing it (and the trim threshold) turns off
# the dynamic threshold, under which freed multi-MB blocks go back to the OS and every call
# page-faults them in again.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20
_allocator = "default"


def tune_allocator() -> str:
    """Keep freed memory for reuse instead of returning it to the OS at once (glibc only).

    PyTorch's eager CPU ops allocate a fresh output per call; under glibc's defaults a
    multi-MB output can be mmapped and unmapped per call, and page-faulting it in adds time
    by amounts that depend on the exact order of allocations, so timings would rank configs by
    glibc's heuristics rather than by their kernels (``benchmarks/allocator.py``: MiniLM on
    torch-cpu, fp32 73-81 ms under the defaults vs 65-68 ms with this, 2-core EPYC). Called
    when a worker process starts (and by the benchmarks), before any timing. The deployed
    model wants the same in production: ``MALLOC_MMAP_THRESHOLD_=33554432
    MALLOC_TRIM_THRESHOLD_=268435456`` or jemalloc / tcmalloc. Returns what the environment
    records (``"default"`` where not glibc)."""
    global _allocator
    if _allocator != "default":
        return _allocator
    preloaded = [lib for lib in ("jemalloc", "tcmalloc", "mimalloc")
                 if lib in os.environ.get("LD_PRELOAD", "")]
    if preloaded:  # glibc's mallopt would succeed and change nothing
        _allocator = f"{preloaded[0]} (LD_PRELOAD)"
        return _allocator
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError, TypeError):  # musl, macOS, Windows: leave them alone
        return _allocator
    done = [f"{name} {value >> 20} MiB" for name, param, value in (
        ("mmap_threshold", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ("trim_threshold", _M_TRIM_THRESHOLD, TRIM_THRESHOLD)) if libc.mallopt(param, value) == 1]
    if done:
        _allocator = f"glibc {version} mallopt: " + ", ".join(done)
    return _allocator


def environment(device: torch.device) -> Environment:
    return Environment(device=str(device), device_name=device_name(device),
                       threads=torch.get_num_threads(),
                       versions=versions() | cuda_versions(device), host=platform.node(),
                       allocator=_allocator)


def cuda_versions(device: torch.device) -> dict[str, str]:
    """The CUDA runtime torch was built with and the cuDNN it loaded, for a figure measured on
    a GPU (a kernel's speed depends on them as much as on torch's own version)."""
    if device.type != "cuda":
        return {}
    out = {"cuda": str(torch.version.cuda)}
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if cudnn is not None:
        out["cudnn"] = str(cudnn)
    return out
