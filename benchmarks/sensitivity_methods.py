"""How the sensitivity stage computes its two costly terms, side by side from one run.

- Tr(H) by Hutchinson probes: Hessian-vector products by double backward vs the exact
  Gauss-Newton form (models without labels, where the loss is the squared error to the float
  outputs; the default ``auto`` picks it there). Same probes, same samples: time, and how alike
  the layer orderings come out (Spearman rank correlation of the traces and of the Hessian
  terms, trace x perturbation, which the Hessian-only ordering sorts by).
- The inter-layer (leave-one-out) terms computed in full vs with the shared prefix replayed:
  time, the records' size, and whether every term is bit-identical.

    python benchmarks/sensitivity_methods.py [--model minilm-l6] [--probes 16] [--samples 128]
                                            [--out FILE.md]
"""

from __future__ import annotations

import datetime as dt
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import parser, positive_int, quiet_logs, write_out

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import Settings  # noqa: E402
from app.schemas import ModelRef  # noqa: E402
from app.storage import open_store  # noqa: E402
from workers.engine import env  # noqa: E402
from workers.engine.context import LocalContext  # noqa: E402
from workers.engine.quant import sensitivity as qsens  # noqa: E402
from workers.engine.quant.formats import parse  # noqa: E402
from workers.engine.quant.prefix import PrefixReplay  # noqa: E402
from workers.engine.quant.prepare import build_task  # noqa: E402


def spearman(a: dict[str, float], b: dict[str, float]) -> float:
    names = list(a)
    ra = np.argsort(np.argsort([a[n] for n in names]))
    rb = np.argsort(np.argsort([b[n] for n in names]))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", default="minilm-l6", choices=["minilm-l6", "digits-cnn"])
    ap.add_argument("--probes", type=positive_int, default=16)
    ap.add_argument("--samples", type=positive_int, default=128, help="calibration samples")
    ap.add_argument("--precision", default="int8", help="the level every layer goes to")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    try:
        fmt = parse(args.precision)
    except ValueError as exc:
        ap.error(f"argument --precision: {exc}")
    quiet_logs()
    store = Path(tempfile.mkdtemp(prefix="sens-bench-store-"))
    with tempfile.TemporaryDirectory() as tmp:
        ctx = LocalContext(Path(tmp), store=open_store(Settings(store_url=store.as_uri())))
        _, task = build_task(ModelRef(zoo=args.model), None, None, eval_samples=8,
                             calib_samples=args.samples, ctx=ctx)
    task.ctx = None  # no memo: every loss below is computed, so the timings compare work
    names = list(task.layers)
    fmt_of = {n: fmt for n in names}

    traces: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    methods = ["double-backward"] + ([] if task.labeled else ["gauss-newton"])
    # One untimed warm-up of each method and of each way to compute the inter-layer terms (one
    # probe, a few samples, one restored layer), so that the row timed first does not also pay
    # for first-call setup (allocator, autograd, kernels): the same warm-up for every row.
    for method in methods:
        qsens.hessian_traces(task, names, 1, min(4, args.samples), seed=0, method=method)
    for replay in (False, True):
        qsens.dependency_terms(task, names, fmt_of, prefix_replay=replay, restore=names[:1])
    for method in methods:
        t0 = time.perf_counter()
        traces[method] = qsens.hessian_traces(task, names, args.probes, args.samples, seed=0,
                                              method=method)
        seconds[method] = time.perf_counter() - t0
    terms = {m: {s.name: s.hessian_term for s in qsens.hessian_terms(task, names, fmt_of, t)}
             for m, t in traces.items()}

    plan = PrefixReplay.plan(task, names)
    deps: dict[bool, dict[str, float]] = {}
    dep_s: dict[bool, float] = {}
    for replay in (False, True):
        t0 = time.perf_counter()
        deps[replay] = qsens.dependency_terms(task, names, fmt_of, prefix_replay=replay)
        dep_s[replay] = time.perf_counter() - t0
    identical = all(deps[True][n] == deps[False][n] for n in names)

    lines = [
        "# Sensitivity terms, how they are computed — "
        f"{env.device_name(torch.device('cpu'))}, {dt.date.today().isoformat()}", "",
        f"Command: `python benchmarks/sensitivity_methods.py --model {args.model} --probes "
        f"{args.probes} --samples {args.samples} --precision {args.precision}`; torch "
        f"{torch.__version__} (Python {platform.python_version()}), {torch.get_num_threads()} "
        f"threads; {len(names)} layers, loss "
        + ("cross-entropy with the labels" if task.labeled else
           "squared error to the float outputs")
        + "; every row timed once after the same untimed warm-up (one probe / one restored "
        "layer), ratios against the first row of its table in this run.", "",
        "| Tr(H) estimator | seconds | vs double backward | Spearman of traces | "
        "Spearman of Hessian terms |",
        "| --- | --- | --- | --- | --- |",
    ]
    base = seconds["double-backward"]
    for m in methods:
        lines.append(f"| {m} | {seconds[m]:.1f} | {seconds[m] / base:.2f}x | "
                     f"{spearman(traces['double-backward'], traces[m]):.3f} | "
                     f"{spearman(terms['double-backward'], terms[m]):.3f} |")
    if task.labeled:
        lines += ["", "(Labels: Gauss-Newton is not exact for cross-entropy, so it is refused.)"]
    lines += [
        "", "| inter-layer terms | seconds | vs in full |", "| --- | --- | --- |",
        f"| in full | {dep_s[False]:.1f} | 1.00x |",
        f"| prefix replayed | {dep_s[True]:.1f} | {dep_s[True] / dep_s[False]:.2f}x |", "",
        f"Replay records: {(plan.nbytes if plan else 0) / 1e6:.0f} MB "
        + ("(no module to replay); " if plan is None else
           f"({len(plan.skip)} restored layers skip a prefix); ")
        + f"every term {'bit-identical' if identical else 'NOT identical'} to computing in full.",
        ""]
    print("\n".join(lines), flush=True)
    write_out(args.out, lines)


if __name__ == "__main__":
    main()
