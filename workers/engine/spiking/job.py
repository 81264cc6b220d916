"""The ``spiking`` job: a spiking model beside its non-spiking twin.

``digits-cnn``: the zoo CNN is converted (``convert``) and fine-tuned; its twin is the CNN.
``char-rwkv``: a character RWKV and its SpikeGPT twin (``rwkv``) are trained with the same
steps, data order and loss kernel (cached in the object store, keyed by their settings).
Both sides are then evaluated on held-out data with ``OpCounter`` on, timed on this machine,
and the spiking model is saved (safetensors + a JSON config that :func:`load` rebuilds).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load as load_st_bytes
from safetensors.torch import save as save_st_bytes
from torch import nn

from app.schemas import SpikingLayer, SpikingResult, SpikingSpec, TextSample
from workers.engine import char_lm, datasets, env, zoo
from workers.engine.backends.torch_runtime import ieee_fp32
from workers.engine.context import JobContext
from workers.engine.spiking import convert as conv
from workers.engine.spiking.ops import ENERGY_NOTE, PJ_PER_AC, PJ_PER_MAC, Counts, OpCounter
from workers.engine.spiking.rwkv import RWKVLM
from workers.engine.timing import measure

RWKV_VERSION = "v1"
RWKV_TRAIN: dict[str, Any] = {"batch_size": 32, "lr": 3e-3, "d_model": 128, "layers": 2}
PROMPTS = ("Return the ", "If the ")


def _wall_ms(model: nn.Module, x: torch.Tensor, items: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time of one forward over ``x``, per item, in ms."""
    with torch.no_grad():
        timing = measure(lambda: model(x), warmup=0, repeats=repeats, device=x.device)
    return min(timing.samples_ms) / items


def _counted(model: nn.Module, run: Callable[[], float]) -> tuple[float, Counts]:
    """``run()``'s quality figure and the operations it took. In IEEE fp32: cuDNN's default TF32
    convolutions would give a CUDA figure the saved model does not reproduce on the CPU."""
    with OpCounter(model) as ops, ieee_fp32():
        quality = run()
    return quality, ops.counts


def _rwkv(spec: SpikingSpec, spiking: bool, ctx: JobContext, frac: tuple[float, float],
          device: torch.device) -> tuple[RWKVLM, dict[str, Any]]:
    cfg = {**RWKV_TRAIN, "steps": spec.steps, "seed": spec.seed, "beta": spec.decay()}
    name = "spikegpt" if spiking else "rwkv"

    def check(step: int) -> None:
        if step % 25 == 0:
            ctx.progress(f"train-{name}", frac[0] + (frac[1] - frac[0]) * step / spec.steps,
                         f"training {name}: step {step} of {spec.steps}")

    def train() -> tuple[nn.Module, dict[str, Any]]:
        torch.manual_seed(spec.seed)
        model = RWKVLM(cfg["d_model"], cfg["layers"], spiking, spec.decay()).to(device)
        model.train()
        seconds = char_lm.fit(model, spec.steps, cfg["batch_size"], cfg["lr"], spec.seed, check)
        ctx.log.info("trained %s on %s: %d steps in %.1f s", name, device.type, spec.steps,
                     seconds)
        return model.eval(), {"train": cfg, "train_seconds": round(seconds, 2),
                              "device": device.type}

    key = (f"zoo/char-{name}/{RWKV_VERSION}-s{spec.steps}-seed{spec.seed}"
           + (f"-beta{spec.decay()}" if spiking else ""))
    state, meta = zoo.cached_training(key, train, ctx.store, device)
    model = RWKVLM(cfg["d_model"], cfg["layers"], spiking, spec.decay())
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def _language(spec: SpikingSpec, ctx: JobContext, device: torch.device) -> dict[str, Any]:
    twin, twin_meta = _rwkv(spec, False, ctx, (0.02, 0.4), device)
    snn, snn_meta = _rwkv(spec, True, ctx, (0.4, 0.8), device)
    ctx.progress("evaluate", 0.82, "bits per character and operations on held-out text")
    test = char_lm.windows("test")
    tokens = test.inputs["x"].numel()

    def bpc(model: nn.Module) -> Callable[[], float]:
        return lambda: math.log2(char_lm.held_out_perplexity(model))

    tq, tc = _counted(twin, bpc(twin))
    sq, sc = _counted(snn, bpc(snn))
    ctx.progress("samples", 0.92, "generating text")
    samples = [TextSample(prompt=p, twin=twin.generate(p, spec.sample_length, seed=spec.seed + i),
                          spiking=snn.generate(p, spec.sample_length, seed=spec.seed + i))
               for i, p in enumerate((PROMPTS * 4)[:spec.samples])]
    x = test.inputs["x"][:16].to(device)
    return {"twin": twin, "snn": snn, "metric": "bits_per_char", "per": "token", "items": tokens,
            "twin_quality": tq, "spiking_quality": sq, "gap": sq - tq, "twin_counts": tc,
            "spiking_counts": sc, "samples": samples, "time_steps": None,
            "wall": (_wall_ms(twin, x, x.numel()), _wall_ms(snn, x, x.numel())),
            "train_seconds": twin_meta["train_seconds"] + snn_meta["train_seconds"],
            "config": snn.config,
            "method": (f"both trained {spec.steps} steps (AdamW, one-cycle lr {RWKV_TRAIN['lr']}, "
                       f"batch {RWKV_TRAIN['batch_size']} x {char_lm.CONTEXT} characters, loss by "
                       "linear_cross_entropy) on the first 90% of corpus.txt; bits per character "
                       f"on the last 10% ({tokens} tokens, {char_lm.CONTEXT}-character windows)")}


def _classifier(spec: SpikingSpec, ctx: JobContext, device: torch.device) -> dict[str, Any]:
    ctx.progress("load", 0.02, "loading digits-cnn")
    ann, _ = zoo.digits_cnn(ctx.store)
    ann = ann.to(device)
    tr, te = datasets.digits("train"), datasets.digits("test")
    assert tr.labels is not None and te.labels is not None
    x, y, xt, yt = (t.to(device) for t in (tr.inputs["x"], tr.labels, te.inputs["x"], te.labels))

    def check(epoch: int) -> None:
        ctx.progress("fine-tune", 0.05 + 0.75 * epoch / max(1, spec.epochs),
                     f"surrogate-gradient fine-tuning: epoch {epoch + 1} of {spec.epochs}")

    snn, info = conv.convert(ann, x, y, spec.time_steps, spec.decay(), spec.epochs,
                             seed=spec.seed, check=check)
    ctx.log.info("converted accuracy before fine-tuning (train): %.4f",
                 info["converted_train_accuracy"])
    ctx.progress("evaluate", 0.85, "accuracy and operations on digits test")
    tq, tc = _counted(ann, lambda: conv.accuracy(ann, xt, yt))
    sq, sc = _counted(snn, lambda: conv.accuracy(snn, xt, yt))
    return {"twin": ann, "snn": snn, "metric": "accuracy", "per": "sample", "items": len(xt),
            "twin_quality": tq, "spiking_quality": sq, "gap": tq - sq, "twin_counts": tc,
            "spiking_counts": sc, "samples": [], "time_steps": spec.time_steps,
            "wall": (_wall_ms(ann, xt, len(xt)), _wall_ms(snn, xt, len(xt))),
            "train_seconds": info["fine_tune_seconds"],
            "config": {"time_steps": spec.time_steps, "beta": spec.decay()},
            "method": (f"digits-cnn converted (thresholds: 99th percentile of each ReLU's "
                       f"activations), fine-tuned {spec.epochs} epochs (Adam lr 5e-4, batch 64, "
                       f"atan surrogate) on digits train; accuracy on digits test ({len(xt)})")}


def _layers(twin: Counts, snn: Counts) -> list[SpikingLayer]:
    """Row per weight layer; the converted CNN's layers have other names than the twin's, but
    the same order."""
    rows = []
    for (_, t), (name, s) in zip(twin.layers.items(), snn.layers.items(), strict=True):
        rows.append(SpikingLayer(name=name, input="spikes" if s.binary else "analog",
                                 input_spike_rate=s.input_rate, twin_macs=t.dense_macs,
                                 spiking_acs=s.acs, spiking_macs=s.macs))
    return rows


def _ratio(num: float, den: float) -> float:
    """``num / den``; a side that did no work makes it unbounded (inf), and 0 / 0 NaN. Both are
    valid results: the schema writes them as the JSON strings "Infinity" / "NaN"."""
    if den:
        return num / den
    return math.inf if num else math.nan


def _figures(tc: Counts, sc: Counts, n: int) -> dict[str, Any]:
    """Operation and energy fields of ``SpikingResult``, per item, from the twin's and the
    spiking model's counts over ``n`` items."""
    snn_ops = sc.acs + sc.macs
    e_twin, e_snn = tc.energy_pj() / n, sc.energy_pj() / n
    note = f"{ENERGY_NOTE} ({PJ_PER_AC} pJ/AC, {PJ_PER_MAC} pJ/MAC)"
    if not snn_ops:  # a silent SNN: say why the ratios are not numbers rather than crash
        note += ("; the spiking model did no synaptic operation (no spike reached a weight "
                 "layer), so op_ratio and energy_ratio are unbounded (NaN where the twin did none "
                 "either)")
    return {"twin_macs": tc.macs / n, "spiking_acs": sc.acs / n, "spiking_macs": sc.macs / n,
            "neuron_updates": sc.neuron_updates / n, "op_ratio": _ratio(tc.macs, snn_ops),
            "energy_twin_pj": e_twin, "energy_spiking_pj": e_snn,
            "energy_ratio": _ratio(e_twin, e_snn),
            "energy_ratio_with_neurons": _ratio(e_twin, sc.energy_pj(with_neurons=True) / n),
            "energy_note": note}


def load(config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """The spiking model from the job's ``spiking.json`` and ``spiking.safetensors``."""
    if config["model"] == "char-rwkv":
        model: nn.Module = RWKVLM(config["d_model"], config["layers"], True, config["beta"])
    else:
        model = conv.SpikingClassifier(conv.stages_of(zoo.DigitsCNN()), config["time_steps"],
                                       config["beta"])
    model.load_state_dict(state)
    return model.eval()


def load_bytes(config_json: bytes, weights: bytes) -> nn.Module:
    return load(json.loads(config_json), load_st_bytes(weights))


def run(spec: SpikingSpec, ctx: JobContext) -> SpikingResult:
    t0 = time.perf_counter()
    device = env.resolve_device(spec.device)
    r = (_language(spec, ctx, device) if spec.model == "char-rwkv"
         else _classifier(spec, ctx, device))
    tc, sc, n = r["twin_counts"], r["spiking_counts"], r["items"]
    layers = _layers(tc, sc)
    snn: nn.Module = r["snn"]
    config = {"model": spec.model, **r["config"]}
    ctx.save_artifact("spiking.safetensors",
                      save_st_bytes({k: v.cpu().contiguous() for k, v in snn.state_dict().items()}),
                      "application/octet-stream")
    ctx.save_artifact("spiking.json", json.dumps(config, indent=1).encode(), "application/json")
    result = SpikingResult(
        model=spec.model, metric=r["metric"], twin_quality=r["twin_quality"],
        spiking_quality=r["spiking_quality"], quality_gap=r["gap"],
        parameters=sum(p.numel() for p in snn.parameters()), per=r["per"],
        time_steps=r["time_steps"], layers=layers,
        spike_rates={k: v.rate for k, v in sc.neurons.items()},
        **_figures(tc, sc, n), wall_ms_twin=r["wall"][0], wall_ms_spiking=r["wall"][1],
        samples=r["samples"],
        train_seconds=r["train_seconds"], seconds=time.perf_counter() - t0, method=r["method"],
        environment=env.environment(device))
    ctx.save_artifact("operations.json", json.dumps([x.model_dump() for x in layers]).encode(),
                      "application/json")
    ctx.progress("done", 1.0, f"{r['metric']}: twin {r['twin_quality']:.4f}, spiking "
                 f"{r['spiking_quality']:.4f}; energy ratio {result.energy_ratio:.1f}x (estimate)")
    return result
