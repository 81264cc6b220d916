"""Mixed precision on digits-cnn and minilm-l6 (and char-gpt, on request): one table per model
from one run.

Rows: fp32 baseline, uniform int8, ours (augmented Hessian + bisection), Hessian-only ordering,
random ordering. Each search runs inside the same job (same data, same budget); afterwards the
configurations are re-timed on the backend *interleaved* (round-robin, same process, same
threads) so drift on a busy machine hits them alike.

    python benchmarks/mixed_precision.py [--models digits-cnn,minilm-l6]
        [--backend onnxruntime-cpu|torch-cpu|torch-cuda] [--out FILE.md]
"""

from __future__ import annotations

import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import layer_counts, name_list, parser, positive_int, quiet_logs, versions, write_out

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import Settings  # noqa: E402
from app.schemas import MixedPrecisionResult, MixedPrecisionSpec  # noqa: E402
from app.storage import open_store  # noqa: E402
from workers.engine import env, mixed_precision  # noqa: E402
from workers.engine.backends.base import interleaved_latency  # noqa: E402
from workers.engine.context import LocalContext  # noqa: E402
from workers.engine.quant.formats import parse  # noqa: E402
from workers.engine.quant.prepare import build_task  # noqa: E402

# Default levels: digits-cnn (convolutions) int8-static -> int4, MiniLM int8 -> int4.
SETTINGS: dict[str, dict[str, object]] = {
    "digits-cnn": {"batch_size": 256, "eval_samples": 360, "repeats": 30,
                   "sensitivity": {"probes": 16, "calibration_samples": 256}},
    "char-gpt": {"batch_size": 8, "eval_samples": 256, "repeats": 20,
                 "sensitivity": {"probes": 8, "calibration_samples": 64}},
    "minilm-l6": {"batch_size": 8, "eval_samples": 128, "repeats": 10, "frontier_points": 4,
                  "sensitivity": {"probes": 4, "calibration_samples": 32}},
}
ORDERINGS = [("ours (augmented)", "augmented"), ("Hessian-only", "hessian"),
             ("random order", "random")]


def run_model(name: str, store_dir: Path, rounds: int, backend_name: str
              ) -> tuple[MixedPrecisionResult, list[str]]:
    spec = MixedPrecisionSpec.model_validate({"model": {"zoo": name}, **SETTINGS[name],
                                              "backend": backend_name,
                                              "baselines": ["uniform", "hessian", "random"]})
    with tempfile.TemporaryDirectory() as tmp:
        ctx = LocalContext(Path(tmp), store=open_store(Settings(store_url=store_dir.as_uri())))
        t0 = time.perf_counter()
        res = mixed_precision.run(spec, ctx)
        wall = time.perf_counter() - t0
        loaded, task = build_task(spec.model, spec.dataset, res.metric, spec.eval_samples,
                                  spec.sensitivity.calibration_samples, ctx)
    example = tuple(t[: spec.batch_size] for t in task.eval_inputs)
    backend = mixed_precision.open_backend(spec.backend, task, example, loaded.input_names,
                                           torch.get_num_threads())
    by_ordering = {s.ordering: s for s in res.searches}
    rows: list[tuple[str, str | None]] = [("fp32", None)]
    rows += [(f"uniform {o.removeprefix('uniform:')}", o) for o in by_ordering
             if o.startswith("uniform:")]
    rows += ORDERINGS
    configs = {}
    for label, key in rows:
        point = res.baseline if key is None else by_ordering[key].result
        cfg = {n: backend.native_format(n, parse(p, spec.int4_group_size))
               for n, p in point.config.items()}
        configs[label] = (point, backend.realize(cfg))
    # Re-timed interleaved, all together, with the job's own round-robin timer.
    warmup, repeats = 2, max(3, spec.repeats // rounds) * rounds
    samples = interleaved_latency({k: s for k, (_, s) in configs.items()}, example, warmup,
                                  repeats, rounds)
    base_ms = statistics.median(samples["fp32"])
    lines = [
        f"### {name} — budget {res.budget.value:g} relative on {res.metric} "
        f"(threshold {res.threshold:.6f}), batch {spec.batch_size}, "
        f"{torch.get_num_threads()} threads",
        "",
        f"Latency: median of {repeats} runs per config after {warmup} warm-up runs, re-timed "
        f"interleaved in {min(rounds, repeats)} rounds; vs fp32 = ratio to the fp32 row's "
        "median of this same timing.",
        "",
        f"| config | layers quantized | {res.metric} ({spec.backend}) | within budget | "
        "latency median ms | vs fp32 | size MB | evaluations | search s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, key in rows:
        point, _ = configs[label]
        ms = statistics.median(samples[label])
        run = by_ordering.get(key) if key else None
        quant = layer_counts(point.config)
        lines.append(
            f"| {label} | {quant} | {point.deployed_metric:.6f} | "
            f"{'yes' if point.within_budget else 'no'} | {ms:.3f} | {ms / base_ms:.3f}x | "
            f"{(point.size_bytes or 0) / 1e6:.2f} | {run.evaluations if run else 0} | "
            f"{run.seconds if run else 0:.1f} |")
    lines += ["", f"Job chose **{res.chosen.label}** ({res.why}); latency reduction reported "
              f"by the job {res.latency_reduction:.1%}. Latency gate (x the level above): "
              + ", ".join(f"{k} {v:.2f}" for k, v in res.latency_gate.items())
              + f". Stage seconds: {res.stage_seconds}; job wall time {wall:.0f} s; "
              f"{res.evaluations} simulated evaluations in all.", ""]
    return res, lines


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--models", default="digits-cnn,minilm-l6", type=name_list(SETTINGS),
                    help=f"comma-separated, of: {', '.join(SETTINGS)}")
    ap.add_argument("--rounds", type=positive_int, default=5,
                    help="interleaved timing rounds (each config timed repeats/rounds per round)")
    ap.add_argument("--backend", default="onnxruntime-cpu",
                    choices=["onnxruntime-cpu", "torch-cpu", "torch-cuda"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    quiet_logs()
    allocator = env.tune_allocator()  # as the workers run
    store = Path(tempfile.mkdtemp(prefix="mp-bench-store-"))
    device = torch.device("cuda" if args.backend == "torch-cuda" else "cpu")
    header = [f"# Mixed precision on {args.backend} — {env.device_name(device)}, "
              f"{dt.date.today().isoformat()}", "",
              f"Command: `python benchmarks/mixed_precision.py --models {','.join(args.models)} "
              f"--backend {args.backend} --rounds {args.rounds}`; "
              f"{versions('torch', 'onnxruntime')}; allocator: {allocator}.", ""]
    print("\n".join(header), flush=True)
    out = header
    for name in args.models:
        _, lines = run_model(name, store, args.rounds, args.backend)
        print("\n".join(lines), flush=True)
        out += lines
    write_out(args.out, out)


if __name__ == "__main__":
    main()
