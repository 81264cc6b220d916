"""LoRA recovery in the mixed-precision search: the same job, the same budget, with and without
adapters. One table from one run.

The job searches as usual (ours: augmented Hessian ordering + bisection), then bisects again
above that boundary on the metric each config reaches after its LoRA adapters are trained
(merged into the weights before quantization, so the deployed graph is the plain one). Every
point is realized on ONNX Runtime, its metric re-measured there and all are timed interleaved
in the job.

    python benchmarks/lora_recovery.py [--model minilm-l6] [--steps 100] [--rank 8] [--out FILE.md]
"""

from __future__ import annotations

import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import layer_counts, parser, positive_int, quiet_logs, versions, write_out

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import Settings  # noqa: E402
from app.schemas import ConfigPoint, MixedPrecisionSpec, SearchRun  # noqa: E402
from app.storage import open_store  # noqa: E402
from workers.engine import env, mixed_precision  # noqa: E402
from workers.engine.context import LocalContext  # noqa: E402

SETTINGS: dict[str, dict[str, object]] = {
    # int4 (MatMulNBits): uniform int4 measured 1.041x of fp32 on MiniLM (results/
    # mixed_precision_cpu.md, AMD EPYC, 2026-11-30): no latency to win.
    "minilm-l6": {"batch_size": 8, "eval_samples": 256, "repeats": 30, "frontier_points": 4,
                  "levels": ["int8"],
                  "sensitivity": {"probes": 4, "calibration_samples": 32}},
    "digits-cnn": {"batch_size": 256, "eval_samples": 360, "repeats": 30,
                   "levels": ["int8", "int4"],
                   "sensitivity": {"probes": 16, "calibration_samples": 256}},
}


def _layers(p: ConfigPoint) -> str:
    return layer_counts(p.config)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", default="minilm-l6", choices=sorted(SETTINGS))
    ap.add_argument("--steps", type=positive_int, default=100, help="Adam steps per config")
    ap.add_argument("--rank", type=positive_int, default=8, help="LoRA rank")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    quiet_logs()
    spec = MixedPrecisionSpec.model_validate({
        "model": {"zoo": args.model}, **SETTINGS[args.model], "baselines": ["uniform"],
        "lora": {"rank": args.rank, "steps": args.steps}})
    store = Path(tempfile.mkdtemp(prefix="lora-bench-store-"))
    with tempfile.TemporaryDirectory() as tmp:
        ctx = LocalContext(Path(tmp), store=open_store(Settings(store_url=store.as_uri())))
        t0 = time.perf_counter()
        res = mixed_precision.run(spec, ctx)
        wall = time.perf_counter() - t0
    assert res.lora is not None
    runs = {s.ordering: s for s in res.searches}
    base = res.baseline.latency_ms or 1.0
    rows: list[tuple[str, ConfigPoint, SearchRun | None]] = [("fp32", res.baseline, None)]
    rows += [(o, s.result, s) for o, s in runs.items() if o.startswith("uniform:")]
    rows += [("ours, no recovery", runs["augmented"].result, runs["augmented"]),
             ("ours + LoRA recovery", runs["augmented+lora"].result, runs["augmented+lora"])]
    lora = res.lora
    lines = [
        "# LoRA recovery in the mixed-precision search — "
        f"{env.device_name(torch.device('cpu'))}, {dt.date.today().isoformat()}", "",
        f"Command: `python benchmarks/lora_recovery.py --model {args.model} --steps {args.steps} "
        f"--rank {args.rank}`; {versions('torch', 'onnxruntime')}, "
        f"{torch.get_num_threads()} threads.", "",
        f"Budget {res.budget.value:g} relative on {res.metric} (threshold {res.threshold:.6f}); "
        f"levels {res.levels}; batch {spec.batch_size}; LoRA rank {lora.options.rank}, "
        f"{lora.options.steps} Adam steps (lr {lora.options.learning_rate:g}, batch "
        f"{lora.options.batch_size}) per config on {lora.options.samples} training samples "
        f"disjoint from the {spec.eval_samples} evaluation samples. Latencies: the job's own "
        f"interleaved timing (median of {spec.repeats} runs per config after {spec.warmup} "
        "warm-up runs; vs fp32 = ratio to the fp32 row of that same timing).", "",
        f"| config | layers quantized | {res.metric} (ONNX Runtime) | within budget | "
        "latency median ms | vs fp32 | evaluations | search s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, p, run in rows:
        ms = p.latency_ms or 0.0
        lines.append(f"| {label} | {_layers(p)} | {p.deployed_metric:.6f} | "
                     f"{'yes' if p.within_budget else 'no'} | {ms:.3f} | {ms / base:.3f}x | "
                     f"{run.evaluations if run else 0} | {run.seconds if run else 0:.1f} |")
    plain_ms = lora.plain.latency_ms or 0.0
    rec_ms = lora.recovered.latency_ms or 0.0
    lines += ["", f"Recovered vs plain: {_layers(lora.recovered)} vs {_layers(lora.plain)}, "
              f"latency {rec_ms / plain_ms:.3f}x of the plain search's result "
              f"({rec_ms:.3f} vs {plain_ms:.3f} ms). {lora.trainings} adapter trainings, "
              f"{lora.train_seconds:.0f} s; calibration loss of the recovered config "
              f"{lora.loss_before:.5f} -> {lora.loss_after:.5f}. Job chose "
              f"**{res.chosen.label}** ({res.why}). Stage seconds: {res.stage_seconds}; job wall "
              f"time {wall:.0f} s.", "",
              "LoRA-limits norms of the recovered config's adapters (largest over its layers): "
              f"input {max((n.input_max for n in lora.norms), default=0):.3g}, weight "
              f"{max((n.weight_max for n in lora.norms), default=0):.3g}, A "
              f"{max((n.a_max for n in lora.norms), default=0):.3g}, B "
              f"{max((n.b_max for n in lora.norms), default=0):.3g}; largest ||B A / r||_F "
              f"{max((n.update_fro for n in lora.norms), default=0):.3g}.", ""]
    print("\n".join(lines), flush=True)
    write_out(args.out, lines)


if __name__ == "__main__":
    main()
