"""SLAM against consistency distillation (CD) across hop lengths, on the job's digits teacher:
one table from one run. The paper's case for SLAM is long hops (large skipping steps), where CD's
start-to-end mapping gets hard; this measures where, on our scale, that holds.

    python benchmarks/few_step_ablation.py [--skips 1,4,8,16,32] [--iterations 2000] [--out FILE.md]

Each row trains a full student (a copy of the teacher) with the job's defaults except the hop:
``skip`` grid steps of the N = 32 grid, the teacher's ODE over it in ``skip`` DDIM steps (one per
grid step). Quality as in the job: Frechet distance in digits-cnn features against digits test
at 1 / 2 / 4 sampling steps (lower is better), 100 samples per class, noise seed 0.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from _common import int_list, parser, positive_int, versions, write_out

from workers.engine import env, zoo
from workers.engine.diffusion import quality
from workers.engine.diffusion.distill import DistillConfig, distill, sample
from workers.engine.diffusion.schedule import solve
from workers.engine.diffusion.teacher import digits_flat, teacher

STEPS = (1, 2, 4)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--skips", default="1,4,8,16,32", type=int_list,
                    help="hop lengths, grid steps of N = 32, comma-separated (1 to 32)")
    ap.add_argument("--iterations", type=positive_int, default=2000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    grid = DistillConfig().grid_points
    if any(not 1 <= s <= grid for s in args.skips):  # checked before the teacher trains
        ap.error(f"argument --skips: each skip must be in 1..{grid}, got {args.skips}")
    skips = ",".join(map(str, args.skips))
    load_start = os.getloadavg()[0]
    net, _ = teacher(None)
    cnn, _ = zoo.digits_cnn(None)
    x_train, y_train = digits_flat("train")
    x_test, _ = digits_flat("test")
    real = quality.features(cnn, quality.to_images(x_test))
    labels = torch.arange(10).repeat_interleave(100)

    def fd(gen: torch.Tensor) -> float:
        return quality.frechet(quality.features(cnn, quality.to_images(gen)), real)

    def teacher_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = net(x, t, y)
        return out

    def noise() -> torch.Tensor:
        return torch.randn(len(labels), x_train.shape[1],
                           generator=torch.Generator().manual_seed(0))

    teacher_fd = {s: fd(solve(lambda x, t: teacher_fn(x, t, labels), noise(), s))
                  for s in (100, *STEPS)}
    rows = []
    for skip in args.skips:
        for method in ("slam", "cd"):
            cfg = DistillConfig(method=method,  # type: ignore[arg-type]
                                iterations=args.iterations, skip=skip, teacher_substeps=skip)
            t0 = time.perf_counter()
            student, info = distill(copy.deepcopy(net), teacher_fn, x_train, y_train, cfg)
            seconds = time.perf_counter() - t0
            got = {s: fd(sample(student, labels, s, x_train.shape[1], 0)) for s in STEPS}
            rows.append((skip, method, got, info["final_loss"], seconds))
            print(skip, method, {s: round(v, 2) for s, v in got.items()}, f"{seconds:.0f} s",
                  file=sys.stderr, flush=True)
    e = env.environment(torch.device("cpu"))
    lines = [f"# SLAM vs CD across hop lengths, digits ({e.device_name}, {e.threads} threads, "
             f"{dt.date.today().isoformat()})", "",
             f"`python benchmarks/few_step_ablation.py --skips {skips} --iterations "
             f"{args.iterations}`; {versions('torch')}: full students, {args.iterations} "
             "iterations, N = 32, teacher DDIM steps per hop = skip, s clamped at the grid's "
             "end; other settings the job's defaults. Frechet distance in digits-cnn features "
             "(lower is better). Teacher: "
             + ", ".join(f"{s} steps {v:.2f}" for s, v in teacher_fd.items())
             + f". 1-minute load average {load_start:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end.", "",
             "| skip (of 32) | method | FD 1 step | FD 2 steps | FD 4 steps | final loss | "
             "train s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for skip, method, got, loss, seconds in rows:
        lines.append(f"| {skip} | {method} | " + " | ".join(f"{got[s]:.2f}" for s in STEPS)
                     + f" | {loss:.3g} | {seconds:.0f} |")
    by = {(skip, m): got for skip, m, got, _, _ in rows}
    wins = [f"skip {skip}, {s} steps" for skip, m, got, _, _ in rows if m == "slam"
            for s in STEPS if got[s] < by[(skip, "cd")][s]]
    lines += ["", "SLAM better than CD at: " + ("; ".join(wins) if wins else "none") + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_out(args.out, text)


if __name__ == "__main__":
    main()
