"""Spiking models against their twins, one run: quality, synaptic operations, estimated energy,
wall time per item on this machine, and the spike sparsity the operation ratio rests on.

    python benchmarks/spiking.py [--steps 600] [--out FILE.md]
    python benchmarks/spiking.py --beta-sweep 0.9,0.5,0.1 [--steps 300] [--out FILE.md]

The second form only trains char-rwkv's SpikeGPT (and its twin) once per membrane decay beta
and prints held-out bits/char for each: what chose the job's default beta for it.

digits-cnn: the zoo CNN vs its converted, fine-tuned spiking version (accuracy, per sample).
char-rwkv: a character RWKV vs SpikeGPT of the same size trained the same way (bits per
character on held-out text, per token), with generated text from each.
"""

from __future__ import annotations

import datetime as dt
import sys
import tempfile
from pathlib import Path

import torch
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import float_list, parser, positive_int, versions, write_out

from app.schemas import SpikingResult, SpikingSpec
from workers.engine import env
from workers.engine.context import LocalContext
from workers.engine.spiking import job
from workers.engine.spiking.ops import ENERGY_NOTE


def rows(r: SpikingResult) -> list[str]:
    rates = list(r.spike_rates.values())
    mean_rate = sum(rates) / len(rates)
    twin_name = {"digits-cnn": "CNN (ReLU)", "char-rwkv": "RWKV"}[r.model]
    snn_name = {"digits-cnn": f"spiking CNN, T={r.time_steps}", "char-rwkv": "SpikeGPT"}[r.model]
    q = "{:.4f}" if r.metric == "accuracy" else "{:.3f} bpc"
    return [
        f"| {r.model} | {twin_name} | {q.format(r.twin_quality)} | {r.twin_macs:,.0f} MAC | "
        f"{r.energy_twin_pj / 1e3:,.1f} | {r.wall_ms_twin:.4f} | - |",
        f"| {r.model} | {snn_name} | {q.format(r.spiking_quality)} | {r.spiking_acs:,.0f} AC + "
        f"{r.spiking_macs:,.0f} MAC | {r.energy_spiking_pj / 1e3:,.1f} | {r.wall_ms_spiking:.4f} | "
        f"{mean_rate:.3f} ({min(rates):.3f}-{max(rates):.3f}) |",
        f"| {r.model} | twin / spiking | gap {r.quality_gap:+.4f} | {r.op_ratio:.2f}x | "
        f"{r.energy_ratio:.2f}x ({r.energy_ratio_with_neurons:.2f}x with neuron updates) | "
        f"spiking {r.wall_ms_spiking / r.wall_ms_twin:.1f}x slower | |",
    ]


def beta_sweep(betas: list[float], steps: int, out: Path | None) -> None:
    e = env.environment(torch.device("cpu"))
    lines = [f"# SpikeGPT's membrane decay ({e.device_name}, {e.threads} threads, "
             f"{dt.date.today().isoformat()})", "",
             f"`python benchmarks/spiking.py --beta-sweep {','.join(map(str, betas))} --steps "
             f"{steps}`; {versions('torch')}: char-rwkv, {steps} training steps per model, "
             "seed 0; held-out bits/char (lower is better).", "",
             "| beta | SpikeGPT bits/char | RWKV twin bits/char | gap | job s |",
             "| --- | --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as tmp:
        for beta in betas:
            r = job.run(SpikingSpec(model="char-rwkv", steps=steps, samples=0, beta=beta),
                        LocalContext(Path(tmp) / str(beta)))
            lines.append(f"| {beta:g} | {r.spiking_quality:.3f} | {r.twin_quality:.3f} | "
                         f"{r.quality_gap:+.3f} | {r.seconds:.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    write_out(out, text)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=positive_int, default=600,
                    help="char-rwkv training steps (each)")
    ap.add_argument("--beta-sweep", default=[], type=float_list,
                    help="comma-separated betas in (0, 1]: char-rwkv only")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if any(not 0 < b <= 1 for b in args.beta_sweep):
        ap.error(f"argument --beta-sweep: each beta must be in (0, 1], got {args.beta_sweep}")
    try:  # the job's own limits, checked before anything trains
        for beta in args.beta_sweep or [None]:
            SpikingSpec(model="char-rwkv", steps=args.steps, beta=beta)
    except ValidationError as exc:
        ap.error("; ".join(f"{'/'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    if args.beta_sweep:
        beta_sweep(args.beta_sweep, args.steps, args.out)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in (SpikingSpec(model="digits-cnn"),
                     SpikingSpec(model="char-rwkv", steps=args.steps, samples=2)):
            ctx = LocalContext(Path(tmp) / spec.model)
            results.append(job.run(spec, ctx))
            print(f"{spec.model}: {results[-1].seconds:.0f} s", file=sys.stderr)
    e = env.environment(torch.device("cpu"))
    lines = [f"# Spiking vs twin ({e.device_name}, {e.threads} threads, "
             f"{dt.date.today().isoformat()})", "",
             f"`python benchmarks/spiking.py --steps {args.steps}`; {versions('torch')} (job "
             f"defaults; char-rwkv: {args.steps} training steps per model). Per item: per test "
             "sample (digits-cnn, 360 samples) or per held-out token (char-rwkv). Energy: "
             + ENERGY_NOTE + ". Wall time (the job's: best of 3 passes over the evaluation "
             "set, no warm-up, divided by its items): PyTorch on this CPU, where spikes are "
             "dense float tensors: it shows the cost of simulating spikes here, not "
             "neuromorphic hardware.", "",
             "| model | network | quality | synaptic ops / item | est. energy / item (nJ) | "
             "wall ms / item | spike rate (mean, min-max over LIF layers) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines += rows(r)
    for r in results:
        lines += ["", f"## {r.model}: per layer (totals over the evaluation set)", "",
                  "| layer | input | input spike rate | twin MACs | spiking ACs | spiking MACs |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {x.name} | {x.input} | "
                  f"{'' if x.input_spike_rate is None else f'{x.input_spike_rate:.3f}'} | "
                  f"{x.twin_macs:,} | {x.spiking_acs:,} | {x.spiking_macs:,} |" for x in r.layers]
        lines += ["", f"Method: {r.method}. Training / fine-tuning {r.train_seconds:.0f} s, "
                  f"job {r.seconds:.0f} s."]
        for s in r.samples:
            lines += ["", f"Prompt `{s.prompt!r}`:", "", "RWKV:", "```", s.twin, "```",
                      "SpikeGPT:", "```", s.spiking, "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    write_out(args.out, text)


if __name__ == "__main__":
    main()
