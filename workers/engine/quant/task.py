"""What a search evaluates: a model, its quantizable layers, evaluation and calibration data,
the metric and budget, and a memoized evaluation of any per-layer config in simulation."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from app.filechecks import IGNORE_INDEX
from workers.engine.char_lm import perplexity
from workers.engine.context import (
    JobContext,
    UserError,
    compute_once,
    inputs_at_fault,
    memo_key,
)
from workers.engine.datasets import check_class_labels
from workers.engine.quant.fake import simulate
from workers.engine.quant.formats import LayerFormat

Config = dict[str, LayerFormat]


def quantizable_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv layers, by qualified name, in execution-definition order."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d)
    return {n: m for n, m in module.named_modules() if isinstance(m, kinds)}


def _accuracy(out: torch.Tensor, labels: torch.Tensor | None, ref: torch.Tensor) -> float:
    assert labels is not None
    scored = labels != IGNORE_INDEX  # positions to skip, as cross-entropy skips them
    return float((out.argmax(dim=-1) == labels)[scored].float().mean())


def _cosine(out: torch.Tensor, labels: torch.Tensor | None, ref: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(out.flatten(1).double(),
                                                 ref.flatten(1).double(), dim=1).mean())


def _mse(out: torch.Tensor, labels: torch.Tensor | None, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).pow(2).mean())


def _perplexity(out: torch.Tensor, labels: torch.Tensor | None, ref: torch.Tensor) -> float:
    assert labels is not None
    return perplexity(out, labels)


METRICS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], float], bool]] = {
    "accuracy": (_accuracy, True),
    "cosine": (_cosine, True),
    "mse": (_mse, False),
    "perplexity": (_perplexity, False),
}
# Metrics scored against labels; their smooth loss (Hessian probes) is cross-entropy.
LABELED = {"accuracy", "perplexity"}


@dataclass
class Threshold:
    baseline: float
    value: float
    higher_is_better: bool

    def ok(self, metric: float) -> bool:
        eps = 1e-12
        return metric >= self.value - eps if self.higher_is_better else metric <= self.value + eps


def check_budget_mode(metric: str, mode: str) -> None:
    """Refuse a relative budget on ``mse``: the squared error to the float model's outputs is
    0 for the float model by definition, so every job would fail on its baseline, with advice
    to check data that is fine."""
    if metric == "mse" and mode == "relative":
        raise UserError("metric 'mse' is the squared error to the float model's own outputs, 0 "
                        "for the float model by definition, so a relative budget (a share of "
                        "that 0) allows no change at all: give an absolute budget, e.g. "
                        "{\"metric\": \"mse\", \"mode\": \"absolute\", \"value\": 0.001} "
                        "(the mean squared error you accept)")


def threshold(baseline: float, mode: str, value: float, higher_is_better: bool,
              metric: str | None = None) -> Threshold:
    if metric is not None:
        check_budget_mode(metric, mode)
    if mode == "absolute":
        t = baseline - value if higher_is_better else baseline + value
    else:
        if baseline == 0:
            # a share of 0 is 0: lower-is-better allows no change, higher-is-better allows any
            raise UserError("the float model's metric is 0 on the evaluation data, so a relative "
                            "budget is meaningless (" + ("it allows any config" if
                            higher_is_better else "it allows no change") + "); check the data "
                            "(for accuracy or perplexity, that the labels match the model's "
                            "outputs), or give an absolute budget (mode 'absolute')")
        # a share of the baseline's magnitude, so a negative baseline moves the right way too
        slack = abs(baseline) * (1.0 - value)
        t = baseline - slack if higher_is_better else baseline + slack
    return Threshold(baseline, t, higher_is_better)


@dataclass
class QuantTask:
    module: nn.Module
    layers: dict[str, nn.Module]
    eval_inputs: tuple[torch.Tensor, ...]
    eval_labels: torch.Tensor | None
    calib_inputs: tuple[torch.Tensor, ...]
    calib_labels: torch.Tensor | None
    metric: str
    batch_size: int = 64
    ctx: JobContext | None = None
    # Training data for LoRA recovery (from the end of the data, disjoint from evaluation).
    train_inputs: tuple[torch.Tensor, ...] | None = None
    # the input shapes a .pt2 was exported with, for the advice when the data does not fit
    exported_for: Any = None
    # memo key -> the worker that computed it, for values computed in this run of the job
    computed: dict[str, str] = field(default_factory=dict)
    _ref_eval: torch.Tensor | None = field(default=None, repr=False)
    _ref_calib: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise UserError(f"unknown metric {self.metric!r}; one of {sorted(METRICS)}")
        if self.metric in LABELED and self.eval_labels is None:
            raise UserError(f"metric {self.metric!r} needs a labeled dataset (labels under `y`)")
        # The calibration reference now: losses are computed inside prefix replays, where a
        # forward would consume the records. The evaluation one (512 samples by default) on
        # first use, outside any simulation (``memoized_unless_taken``): a worker computing
        # inter-layer terms for the job never needs it.
        with inputs_at_fault("the model does not run on the dataset's inputs "
                             f"{[list(t.shape) for t in self.calib_inputs]}",
                             exported_for=self.exported_for):
            self._ref_calib = self.forward(self.calib_inputs)
        self._check_finite(self._ref_calib, "calibration")
        if self.metric in LABELED:
            for labels, inputs in ((self.eval_labels, self.eval_inputs),
                                   (self.calib_labels, self.calib_inputs)):
                assert labels is not None
                check_class_labels(labels, self._ref_calib, len(inputs[0]), skip_ignored=True)

    @property
    def labeled(self) -> bool:
        """The calibration loss is the cross-entropy with labels (``loss``), not the squared
        error to the float outputs."""
        return self.metric in LABELED and self.calib_labels is not None

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric][1]

    @property
    def reference(self) -> torch.Tensor:
        """The float model's outputs on the evaluation data."""
        if self._ref_eval is None:
            self._ref_eval = self._check_finite(self.forward(self.eval_inputs), "evaluation")
        return self._ref_eval

    def _check_finite(self, outputs: torch.Tensor, which: str) -> torch.Tensor:
        """The float model's outputs, refused where no figure could be measured against them:
        NaN anywhere (a log or a division by zero inside the model) gives a NaN metric that
        compares false with every budget; +inf breaks softmax, and any inf breaks the distance
        metrics (inf - inf). -inf logits are fine for cross-entropy (a masked class)."""
        nan = int(torch.isnan(outputs).sum())
        inf = int((torch.isinf(outputs) if self.metric not in LABELED
                   else outputs == float("inf")).sum())
        if nan or inf:
            what = " and ".join(f"{v} {k}" for k, v in (("NaN", nan), ("infinite", inf)) if v)
            raise UserError(f"the float model's outputs on the {which} samples hold {what} "
                            f"values (of {outputs.numel()}): no {self.metric} can be measured "
                            "against them. Check the model on these inputs (a log or a division "
                            "of zero, an overflow) or the data")
        return outputs

    @property
    def calib_reference(self) -> torch.Tensor:
        """The float model's outputs on the calibration data."""
        assert self._ref_calib is not None
        return self._ref_calib

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        outs = []
        with torch.inference_mode():
            for i in range(0, len(inputs[0]), self.batch_size):
                out = self.module(*(t[i:i + self.batch_size] for t in inputs))
                if not isinstance(out, torch.Tensor):
                    raise UserError("the model must return one tensor (its logits or "
                                    f"embeddings), not a {type(out).__name__}: export it "
                                    "returning only that tensor")
                outs.append(out)
        return torch.cat(outs).float()

    def score(self, outputs: torch.Tensor) -> float:
        fn, _ = METRICS[self.metric]
        return fn(outputs, self.eval_labels, self.reference)

    def loss(self, outputs: torch.Tensor, calib: bool = True) -> torch.Tensor:
        """The smooth objective behind the metric: cross-entropy with labels for classifiers,
        else squared error to the float model's outputs (summed over features)."""
        labels = self.calib_labels if calib else self.eval_labels
        if self.metric in LABELED and labels is not None:
            return nn.functional.cross_entropy(outputs.reshape(-1, outputs.shape[-1]),
                                               labels.reshape(-1))
        ref = self.calib_reference if calib else self.reference
        return (outputs - ref).pow(2).flatten(1).sum(1).mean()

    def memo_key(self, what: str, config: Mapping[str, LayerFormat]) -> str:
        cfg = sorted((n, f.label(), f.reduce_range, f.per_channel, f.activation_grid, f.compute)
                     for n, f in config.items() if f.precision != "fp32")
        return "mp:" + memo_key(what, self.metric, cfg)

    def memoized(self, what: str, config: Mapping[str, LayerFormat],
                 compute: Callable[[], float],
                 around: Callable[[], AbstractContextManager[object]] | None = None) -> float:
        """``compute()`` under ``config``, memoized in the job (so a retried job resumes) and
        computed once across the job's workers (another worker's piece may hold it: then this
        waits for its value). ``around`` (entered outside the simulation, only on a miss)
        changes the model first: LoRA recovery merges its adapters there, so a hit skips their
        training too."""
        value = self.memoized_unless_taken(what, config, compute, around, wait=True)
        assert value is not None  # waited for
        return value

    def memoized_unless_taken(
            self, what: str, config: Mapping[str, LayerFormat], compute: Callable[[], float],
            around: Callable[[], AbstractContextManager[object]] | None = None, wait: bool = False
    ) -> float | None:
        """As ``memoized``; None where another worker is computing it (unless ``wait``)."""
        key = self.memo_key(what, config)
        attempt = self.ctx.attempt if self.ctx is not None else 1

        def run() -> dict[str, Any]:
            if self.ctx is not None:
                self.ctx.check_cancelled()
            if what != "loss":  # the float reference a metric compares with, before simulating
                _ = self.reference
            with around() if around is not None else nullcontext(), simulate(self.layers, config):
                return {"v": compute(), "attempt": attempt}

        if self.ctx is None:
            value = run()["v"]
            self.computed[key] = "local"
            return float(value)
        got = compute_once(self.ctx, key, run, wait=wait)
        if got is None:
            return None
        if got.get("attempt") == attempt:
            self.computed[key] = str(got["by"])
        return float(got["v"])

    @property
    def evaluations(self) -> int:
        """Evaluations this run of the job computed (here or in its pieces on other workers)
        among those it used; values memoized by an earlier run are not counted."""
        return len(self.computed)

    def computed_by(self) -> dict[str, int]:
        return dict(Counter(self.computed.values()))

    def _metric_now(self) -> float:
        return self.score(self.forward(self.eval_inputs))

    def _loss_now(self) -> float:
        return float(self.loss(self.forward(self.calib_inputs)))

    def evaluate(self, config: Mapping[str, LayerFormat]) -> float:
        """The metric of ``config`` in simulation, on the evaluation data."""
        return self.memoized("metric", config, self._metric_now)

    def evaluate_unless_taken(self, config: Mapping[str, LayerFormat], wait: bool = False
                              ) -> float | None:
        """As ``evaluate``; None where another worker is computing it (unless ``wait``)."""
        return self.memoized_unless_taken("metric", config, self._metric_now, wait=wait)

    def calib_loss(self, config: Mapping[str, LayerFormat]) -> float:
        """The smooth loss of ``config`` in simulation, on the calibration data."""
        return self.memoized("loss", config, self._loss_now)

    def calib_loss_unless_taken(self, config: Mapping[str, LayerFormat], wait: bool = False
                                ) -> float | None:
        """As ``calib_loss``; None where another worker is computing it (unless ``wait``)."""
        return self.memoized_unless_taken("loss", config, self._loss_now, wait=wait)


def config_json(config: Mapping[str, LayerFormat]) -> dict[str, str]:
    return {n: f.label() for n, f in config.items() if f.precision != "fp32"}


def config_key(config: Mapping[str, LayerFormat]) -> str:
    return json.dumps(config_json(config), sort_keys=True)
