"""Linear + cross-entropy: materialized logits vs our chunked path (CPU) / Triton kernel (GPU)
vs the peers, time and peak extra memory of forward + backward, one table from one run.

    python benchmarks/loss_memory.py [--n 2048 --d 512 --v 32768,131072,262144] [--out FILE.md]

On a GPU it adds our Triton kernel, cut-cross-entropy's Triton kernel and Liger-Kernel's fused
linear cross-entropy (install `modelpress[bench]`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_kernels.loss_bench import PEERS_CPU, PEERS_GPU, measure, table


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--v", default="32768,131072,262144")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impls", default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = args.impls.split(",") if args.impls else (PEERS_GPU if device == "cuda" else PEERS_CPU)
    rows = []
    for v in (int(x) for x in args.v.split(",")):
        for impl in impls:
            row = measure(impl, args.n, args.d, v, args.dtype, device, args.repeats)
            rows.append(row)
            print(f"{impl:>18} V={v:>7}: {row.time_ms} ms, {row.peak_extra_bytes} B"
                  + (f"  ({row.error})" if row.error else ""), flush=True)
    lines = [f"# Linear cross-entropy, forward + backward — {device_name()}, "
             f"{dt.date.today().isoformat()}", "",
             f"Command: `python benchmarks/loss_memory.py --n {args.n} --d {args.d} --v {args.v} "
             f"--dtype {args.dtype}`; torch {torch.__version__}. Each case runs in a fresh process; "
             "time is the median of the runs after one warm-up; peak extra memory is the "
             "resident-set (CPU) or allocator (GPU) high-water mark above the inputs during one "
             "forward + backward. `x torch` = ratio to materialized logits at the same size.", "",
             *table(rows), ""]
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
