"""Intrinsic dimension on digits: d_int90 and training runs, galloping bisection vs the paper's
grid sweep (same grid, same seed), plain vs per-layer scaling (structure-aware); and the time
of one projection step, dense vs Fastfood, as D grows (Fastfood ~ D log d, dense ~ D d);
and d_int90 over several seeds (theta0 and P both reseeded) for one model.

    python benchmarks/intrinsic_dimension.py [--models digits-mlp,digits-cnn]
        [--seeds-model digits-mlp --seeds 0,1,2] [--out FILE.md]

(``--models ''`` skips the main table.)
"""

from __future__ import annotations

import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import int_list, name_list, parser, positive_int, versions, write_out

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.schemas import IntrinsicDimensionSpec
from workers.engine import env
from workers.engine.context import LocalContext
from workers.engine.intrinsic import job
from workers.engine.intrinsic.projections import make


def projection_times(d: int = 1000) -> list[str]:
    lines = [f"| D | dense ms (d={d}) | Fastfood ms (d={d}) | dense / Fastfood |",
             "| --- | --- | --- | --- |"]
    x = torch.randn(d)
    for D in (10_000, 40_000, 160_000, 640_000):
        row = []
        for kind in ("dense", "fastfood"):
            if kind == "dense" and D * d * 4 > 3 * 2**30:
                row.append(float("nan"))
                continue
            p = make(kind, D, d, 0)  # type: ignore[arg-type]
            p(x)
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                p(x)
                ts.append((time.perf_counter() - t0) * 1e3)
            row.append(statistics.median(ts))
        lines.append(f"| {D:,} | {row[0]:.2f} | {row[1]:.2f} | {row[0] / row[1]:.1f} |")
    return lines


MODELS = ("digits-mlp", "digits-cnn")


def main() -> None:
    ap = parser(__doc__)
    models_type = name_list(MODELS)
    ap.add_argument("--models", default="digits-mlp,digits-cnn", type=models_type,
                    help=f"comma-separated, of: {', '.join(MODELS)}; '' skips the main table")
    ap.add_argument("--epochs", type=positive_int, default=20)
    ap.add_argument("--grid-models", default="digits-mlp", type=models_type,
                    help="Models also run with the full grid sweep (it costs every grid value).")
    ap.add_argument("--scaling-models", default="digits-mlp,digits-cnn", type=models_type,
                    help="Models also run (bisection) with per-layer scaling.")
    ap.add_argument("--seeds-model", default="digits-mlp", choices=["", *MODELS],
                    help="Model also run (bisection) over --seeds; '' skips it.")
    ap.add_argument("--seeds", default="0,1,2", type=int_list)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.seeds_model and (len(set(args.seeds)) != len(args.seeds) or len(args.seeds) > 8):
        ap.error(f"argument --seeds: at most 8 distinct seeds, got {args.seeds}")
    models = args.models
    out = [f"# Intrinsic dimension on digits — {dt.date.today().isoformat()}, "
           f"{torch.get_num_threads()} CPU threads", "",
           f"Command: `python benchmarks/intrinsic_dimension.py --models '{','.join(models)}' "
           f"--epochs {args.epochs} --grid-models {','.join(args.grid_models)} --scaling-models "
           f"{','.join(args.scaling_models)} --seeds-model '{args.seeds_model}' --seeds "
           f"{','.join(map(str, args.seeds))}` on {env.device_name(torch.device('cpu'))}; "
           f"{versions('torch')}. Fastfood projection, seed 0, default grid "
           f"({len(job.DEFAULT_GRID)} values from 10 to 3000)."]
    print("\n".join(out), flush=True)
    if models:
        head = ["", "| model | D | full acc | target | search | d_int90 | D / d_int90 | runs | "
                "rebuilt acc | compression | seconds |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        print("\n".join(head), flush=True)
        out += head
    for model in models:
        runs = [("bisection", False)]
        runs += [("grid", False)] if model in args.grid_models else []
        runs += [("bisection", True)] if model in args.scaling_models else []
        for how, scaling in runs:
            with tempfile.TemporaryDirectory() as tmp:
                res = job.run(IntrinsicDimensionSpec(model=model, search=how,  # type: ignore[arg-type]
                                                     epochs=args.epochs, layer_scaling=scaling),
                              LocalContext(Path(tmp)))
            how = f"{how} + layer scaling" if scaling else how
            ratio = f"{res.parameters / res.d_int90:.0f}x" if res.d_int90 else "-"
            line = (f"| {model} | {res.parameters:,} | {res.full_accuracy:.4f} | "
                    f"{res.target:.4f} | {how} | {res.d_int90} | {ratio} | {res.training_runs} | "
                    f"{res.rebuilt_accuracy or 0:.4f} | "
                    f"{f'{res.compression_ratio:.0f}x' if res.compression_ratio else '-'} | "
                    f"{res.seconds:.0f} |")
            print(line, flush=True)
            out.append(line)
    if args.seeds_model:
        seeds = args.seeds
        with tempfile.TemporaryDirectory() as tmp:
            res = job.run(IntrinsicDimensionSpec(model=args.seeds_model,  # type: ignore[arg-type]
                                                 epochs=args.epochs, seeds=seeds),
                          LocalContext(Path(tmp)))
        line = (f"{args.seeds_model}, bisection over seeds {seeds}: d_int90 per seed "
                f"{res.d_int90_per_seed}, median {res.d_int90}; {res.training_runs} training "
                f"runs in {res.seconds:.0f} s (one process, no fan-out).")
        print("\n" + line, flush=True)
        out += ["", line]
    tail = ["", "Projection step (one P x), median of 5 after 1 warm-up:", "",
            *projection_times(), ""]
    print("\n".join(tail), flush=True)
    write_out(args.out, out + tail)


if __name__ == "__main__":
    main()
