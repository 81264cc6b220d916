"""The allocator setting the workers run with (``env.tune_allocator``), observed through glibc's
own accounting in fresh processes: the setting is process-wide and cannot be undone."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import resource
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

PROBE = """
import ctypes, json, resource, sys
import torch
from workers.engine import env

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
setting = env.tune_allocator() if sys.argv[1] == "tuned" else "default"
before = libc.mallinfo2()
t = torch.empty(2 << 20).fill_(1.0)  # 8 MiB, far above glibc's default mmap threshold
during = libc.mallinfo2()
del t
after = libc.mallinfo2()
# torch asks for 64-byte aligned blocks; glibc's memalign frees the small tail it cuts off into
# the tcache, where it keeps the freed block from merging back, so each of the next few blocks
# may land above the last one until that tcache bin (7 entries) is full. After that the same
# blocks are reused: a bounded warm-up cost, not a leak. CI caught 2 warm-up blocks failing.
for _ in range(12):
    t = torch.empty(2 << 20).fill_(1.0)
    del t
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):  # later calls' outputs of the same size
    t = torch.empty(2 << 20).fill_(1.0)
    del t
print(json.dumps({"setting": setting, "environment": env.environment(torch.device("cpu")).allocator,
                  "mmapped": during.hblkhd - before.hblkhd,
                  "arena_shrank": during.arena - after.arena,
                  "refaults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}))
"""
# Allocator settings the probe must not inherit (the README tells deployers to set them).
_ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "GLIBC_TUNABLES", "LD_PRELOAD")


def _probe(mode: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if k not in _ALLOCATOR_ENV}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, timeout=120, env=clean).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="glibc < 2.33")
def test_tuned_allocator_keeps_large_blocks_for_reuse() -> None:
    default, tuned = _probe("default"), _probe("tuned")
    mib, pages = 1 << 20, (8 << 20) // resource.getpagesize()
    # Default glibc: the first 8 MiB block is mmapped (and unmapped when freed).
    assert int(default["mmapped"]) >= 8 * mib, default
    assert default["environment"] == "default"
    # Tuned: it comes from the heap, stays there when freed, and later ones of the same size
    # reuse those pages instead of faulting 8 MiB in again each time.
    assert int(tuned["mmapped"]) == 0 and int(tuned["arena_shrank"]) <= 0, tuned
    assert int(tuned["refaults"]) < pages // 4, (tuned, pages)
    assert str(tuned["setting"]).startswith("glibc ") and "mmap_threshold 32 MiB" in str(
        tuned["setting"])
    assert tuned["environment"] == tuned["setting"]

