"""Linear + cross-entropy, forward + backward: materialized logits (``torch``) vs our fused paths
(``chunked`` on the CPU, the Triton kernel on a GPU) vs the peers; time and peak extra memory,
one table from one run.

    python benchmarks/loss_memory.py [--n 2048 --d 512 --v 32768,131072,262144] [--out FILE.md]

On the CPU the peers are cut-cross-entropy's torch.compile path (``pip install
cut-cross-entropy==25.1.1``, extra ``bench``). With CUDA present the GPU section runs instead:
our Triton kernel, cut-cross-entropy's Triton kernel (``cce_triton``) and Liger-Kernel's fused
linear cross-entropy (``liger``) join. A peer that is not installed or fails shows its error in
its row.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
from pathlib import Path

import torch
from _common import int_list, positive_int, write_out

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_kernels import loss_bench
from workers.engine import env

SCALED_NOTE = (
    "- sizes: N = 2048 tokens, D = 512, i.e. the study's N = 8192, D = 2048 scaled by 1/4 each "
    "(D/N, hence the memory ratios, kept): on 2 CPU cores each 8192 x 2048 case takes minutes, "
    "and the materialized V = 256k case would need ~24 GiB of N x V buffers")


def versions(impls: list[str]) -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = [f"torch {torch.__version__}"]
    for pkg, used in (("triton", {"triton", "cce_triton", "liger"}),
                      ("cut-cross-entropy", {"cce_triton", "cce_torch_compile"}),
                      ("liger-kernel", {"liger"})):
        if used & set(impls):
            try:
                out.append(f"{pkg} {version(pkg)}")
            except PackageNotFoundError:
                out.append(f"{pkg} not installed")
    return ", ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=positive_int, default=2048, help="tokens")
    ap.add_argument("--d", type=positive_int, default=512, help="hidden size")
    ap.add_argument("--v", default="32768,131072,262144", type=int_list,
                    help="vocabulary sizes, comma-separated")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=positive_int, default=2,
                    help="timed runs after one warm-up")
    ap.add_argument("--impls", default=None, help="comma-separated; default: by device")
    ap.add_argument("--no-check-grads", action="store_true",
                    help="skip the gradient comparison with the materialized reference")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = (args.impls.split(",") if args.impls
             else loss_bench.PEERS_GPU if device == "cuda" else loss_bench.PEERS_CPU)
    vocab = args.v

    def progress(fraction: float, message: str) -> None:
        print(f"[{fraction:4.0%}] {message}", file=sys.stderr, flush=True)

    load0 = os.getloadavg()[0]
    rows = loss_bench.measure_all(args.n, args.d, vocab, args.dtype, impls, args.repeats, device,
                                  not args.no_check_grads, progress)
    threads = torch.get_num_threads() if device == "cpu" else None
    where = env.device_name(torch.device(device)) + (f", {threads} threads" if threads else "")
    lines = [
        f"# Linear cross-entropy, forward + backward ({device.upper()})", "",
        f"- device: {where}",
        f"- date: {dt.date.today().isoformat()}",
        f"- command: `python {shlex.join(sys.argv)}`",
        f"- versions: {versions(impls)}",
        *([SCALED_NOTE] if (args.n, args.d, device) == (2048, 512, "cpu") else []),
        f"- 1-minute load average just before the run: {load0:.2f} (other processes sharing the "
        "cores; they slow the timings)",
        "- method: each case in a fresh process; time = median of the timed runs after one "
        "warm-up; peak extra memory = " + (
            "the process's resident-set high-water mark (VmHWM, reset via /proc/self/clear_refs "
            "before the run) minus the resident set before it, with glibc mmap threshold 64 KiB "
            "so freed tensors leave at once" if device == "cpu" else
            "max_memory_allocated above the allocation before the run") +
        "; it includes the gradients (N x D + V x D). `x torch` = ratio to materialized logits "
        "at the same size; max abs grad diff = largest |grad - grad of the materialized fp32 "
        "reference| over both inputs.",
        "- `cce_torch_compile` is cut-cross-entropy's torch.compile path: the logits are still "
        "materialized, inside one compiled graph (its fused Triton kernel needs CUDA).", "",
        *loss_bench.table(rows), ""]
    print("\n".join(lines))
    write_out(args.out, lines)


if __name__ == "__main__":
    main()
