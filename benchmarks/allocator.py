"""What ``env.tune_allocator`` buys: MiniLM realized on the torch-cpu backend (all Linear bf16, and
all Linear int8 with per-call activation quantization), batch 8 x 64 tokens, timed in a fresh
process under glibc's default malloc settings and in another after ``tune_allocator`` (freed
memory kept for reuse). Under the defaults a multi-MB output may be mmapped and unmapped per
call, depending on the order of allocations, and the page faults can cost more than the op.

    python benchmarks/allocator.py [--calls 30] [--out FILE.md]
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
import subprocess
import sys
from pathlib import Path

from _common import parser, positive_int, versions, write_out

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, statistics, sys, time
import torch
sys.path.insert(0, {root!r})
from workers.engine import env
allocator = env.tune_allocator() if {tuned} else "glibc defaults"
from workers.engine import datasets, zoo
from workers.engine.backends.torch_runtime import TorchBackend
from workers.engine.quant.formats import parse
from workers.engine.quant.task import quantizable_layers
module, tok = zoo.load_hf_encoder(zoo.minilm_dir())
module.eval()
ids = zoo.tokenize(tok, datasets.sentences())
x = tuple(ids[k][:8] for k in ("input_ids", "attention_mask"))
layers = quantizable_layers(module)
backend = TorchBackend("torch-cpu", module, layers)
out = {{"allocator": allocator, "device": env.device_name(torch.device("cpu")),
        "threads": torch.get_num_threads(), "torch": torch.__version__}}
for prec in ("fp32", "bf16", "int8"):
    cfg = {{n: backend.native_format(n, parse(prec)) for n in layers
            if prec != "fp32" and backend.supports(n, parse(prec))}}
    model = backend.realize(cfg)
    out[prec] = statistics.median(model.latency_ms(x, 5, {calls}))
print(json.dumps(out))
"""


def run(tuned: bool, calls: int) -> dict[str, object]:
    code = CHILD.format(root=str(ROOT), tuned=tuned, calls=calls)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:  # say why: the child's traceback, not just its exit status
        sys.exit(f"the timing process ({'tuned' if tuned else 'glibc defaults'}) failed with "
                 f"exit status {proc.returncode}:\n{proc.stderr[-3000:]}")
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--calls", type=positive_int, default=30,
                    help="timed calls per config and process (median taken)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    # Alternate the two modes so drift on the machine hits both alike.
    runs: dict[bool, list[dict[str, object]]] = {False: [], True: []}
    for _ in range(3):
        for tuned in (False, True):
            runs[tuned].append(run(tuned, args.calls))
    first = runs[True][0]
    lines = [f"# glibc malloc settings vs `env.tune_allocator` — {first['device']}, "
             f"{first['threads']} threads, {dt.date.today().isoformat()}", "",
             f"`python benchmarks/allocator.py --calls {args.calls}`; "
             f"{versions('torch')}. "
             "MiniLM on torch-cpu, batch 8 x 64 tokens; each run a fresh process, median of "
             f"{args.calls} calls after 5 warm-up calls per config; three runs per mode, "
             "alternating. Milliseconds, runs 1 / 2 / 3; last row: tuned / defaults, the "
             "ratio of the medians of the three runs.", "",
             "| allocator | fp32 | all Linear bf16 | all Linear int8 |",
             "| --- | --- | --- | --- |"]
    for tuned in (False, True):
        cells = [" / ".join(f"{float(r[p]):.1f}" for r in runs[tuned])  # type: ignore[arg-type]
                 for p in ("fp32", "bf16", "int8")]
        lines.append(f"| {runs[tuned][0]['allocator']} | " + " | ".join(cells) + " |")
    ratios = [statistics.median(float(r[p]) for r in runs[True])  # type: ignore[arg-type]
              / statistics.median(float(r[p]) for r in runs[False])  # type: ignore[arg-type]
              for p in ("fp32", "bf16", "int8")]
    lines.append("| tuned / defaults | " + " | ".join(f"{x:.3f}x" for x in ratios) + " |")
    print("\n".join(lines), flush=True)
    write_out(args.out, lines)


if __name__ == "__main__":
    main()
