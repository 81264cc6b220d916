"""Why the onnxruntime-cpu backend's default levels differ by model: static int8 where there are
convolutions, dynamic int8 elsewhere. One run, both models, every config deployed on ONNX Runtime
and timed interleaved (same process, same threads):

- digits-cnn: fp32 vs its two convolutions dynamic int8 (ConvInteger) vs static int8
  (QLinearConv); then every layer dynamic vs every layer static;
- minilm-l6: fp32 vs every Linear dynamic int8 vs every Linear static int8, with the cosine to
  the float model's embeddings (static grids are calibrated once, so activation outliers clip).

    python benchmarks/default_levels.py [--repeats 30] [--out FILE.md]
"""

from __future__ import annotations

import datetime as dt
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from _common import parser, positive_int, quiet_logs, versions, write_out

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import Settings  # noqa: E402
from app.schemas import ModelRef  # noqa: E402
from app.storage import open_store  # noqa: E402
from workers.engine import env  # noqa: E402
from workers.engine.backends import onnxruntime_cpu as ortb  # noqa: E402
from workers.engine.backends.base import interleaved_latency, run_batched  # noqa: E402
from workers.engine.context import LocalContext  # noqa: E402
from workers.engine.quant.formats import LayerFormat, parse  # noqa: E402
from workers.engine.quant.prepare import build_task  # noqa: E402

BATCH = {"digits-cnn": 256, "minilm-l6": 8}


def configs(model: str, layers: list[str]) -> dict[str, dict[str, str]]:
    convs = [n for n in layers if n.startswith("conv")]
    if model == "digits-cnn":
        return {"fp32": {}, "convs int8 (ConvInteger)": dict.fromkeys(convs, "int8"),
                "convs int8-static (QLinearConv)": dict.fromkeys(convs, "int8-static"),
                "all int8": dict.fromkeys(layers, "int8"),
                "all int8-static": dict.fromkeys(layers, "int8-static")}
    return {"fp32": {}, "all Linear int8": dict.fromkeys(layers, "int8"),
            "all Linear int8-static": dict.fromkeys(layers, "int8-static")}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--repeats", type=positive_int, default=30,
                    help="timed runs per config (median taken), after 3 warm-up runs")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    quiet_logs()
    env.tune_allocator()
    threads = torch.get_num_threads()
    lines = [f"# Default levels on onnxruntime-cpu — {env.device_name(torch.device('cpu'))}, "
             f"{dt.date.today().isoformat()}", "",
             f"`python benchmarks/default_levels.py --repeats {args.repeats}`; "
             f"{versions('onnxruntime', 'torch')}, {threads} threads. Metric "
             "re-measured on the deployed model (digits-cnn: accuracy on the 360 test digits; "
             "MiniLM: mean cosine to the float embeddings of 256 sentences); latency: median of "
             f"{args.repeats} runs of one batch after 3 warm-up runs, all configs of a model "
             "timed interleaved.", "",
             "| model (batch) | config | metric | latency ms | vs fp32 |",
             "| --- | --- | --- | --- | --- |"]
    store = Path(tempfile.mkdtemp(prefix="levels-bench-store-"))
    for model in ("digits-cnn", "minilm-l6"):
        with tempfile.TemporaryDirectory() as tmp:
            ctx = LocalContext(Path(tmp), store=open_store(Settings(store_url=store.as_uri())))
            loaded, task = build_task(ModelRef(zoo=model), None, None, eval_samples=360 if
                                      model == "digits-cnn" else 256, calib_samples=128, ctx=ctx)
        task.ctx = None
        batch = BATCH[model]
        example = tuple(t[:batch] for t in task.eval_inputs)
        backend = ortb.OrtBackend.open(task.module, example, loaded.input_names, task.layers,
                                       task.calib_inputs, threads)
        layers = [n for n in task.layers if backend.supports(n, parse("int8"))]
        deployed = {}
        metric = {}
        for label, cfg in configs(model, layers).items():
            native: dict[str, LayerFormat] = {
                n: backend.native_format(n, parse(p)) for n, p in cfg.items()}
            native = {n: f for n, f in native.items() if f.realizable}
            deployed[label] = backend.realize(native)
            out = torch.from_numpy(run_batched(deployed[label], task.eval_inputs, batch))
            metric[label] = task.score(out)
        times = interleaved_latency(deployed, example, warmup=3, repeats=args.repeats)
        base = statistics.median(times["fp32"])
        for label in deployed:
            ms = statistics.median(times[label])
            lines.append(f"| {model} ({batch}) | {label} | {task.metric} {metric[label]:.4f} | "
                         f"{ms:.3f} | {ms / base:.3f}x |")
        print("\n".join(lines[-len(deployed):]), flush=True)
    lines.append("")
    print("\n".join(lines), flush=True)
    write_out(args.out, lines)


if __name__ == "__main__":
    main()
