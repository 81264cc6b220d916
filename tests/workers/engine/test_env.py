"""The allocator setting the workers run with (``env.tune_allocator``), observed through glibc's
own accounting in fresh processes: the setting is process-wide and cannot be undone."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

PROBE = """
import ctypes, json, sys
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
print(json.dumps({"setting": setting, "environment": env.environment(torch.device("cpu")).allocator,
                  "mmapped": during.hblkhd - before.hblkhd,
                  "kept_free": after.fordblks - before.fordblks}))
"""


def _probe(mode: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def test_tuned_allocator_keeps_large_blocks_for_reuse() -> None:
    default, tuned = _probe("default"), _probe("tuned")
    mib = 1 << 20
    # Default glibc: the 8 MiB block is mmapped, and unmapped again when freed.
    assert int(default["mmapped"]) >= 8 * mib and int(default["kept_free"]) < mib, default
    assert default["environment"] == "default"
    # Tuned: it comes from the heap and stays there, free, for the next call's output.
    assert int(tuned["mmapped"]) == 0 and int(tuned["kept_free"]) >= 8 * mib, tuned
    assert str(tuned["setting"]).startswith("glibc ") and "mmap_threshold 32 MiB" in str(
        tuned["setting"])
    assert tuned["environment"] == tuned["setting"]

