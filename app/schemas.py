"""The one wire contract: every request and response body of the API, used by the API, the
workers and the SDK alike. Each job kind adds a spec (discriminated by ``kind``) and a result."""

from __future__ import annotations

import math
from datetime import datetime
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
# A new job's progress message while a live worker serves its queue (else it says none does).
WAITING_FOR_WORKER = "waiting for a worker"
JobKind = Literal["benchmark", "sensitivity", "mixed_precision", "loss_benchmark",
                  "intrinsic_dimension", "spiking", "few_step_distill"]
ZooModel = Literal["digits-cnn", "minilm-l6", "char-gpt"]
BuiltinDataset = Literal["digits-test", "digits-calib", "sentences"]
Device = Literal["auto", "cpu", "cuda"]
MAX_INPUT_ELEMENTS = 2**28
_T = TypeVar("_T")


def _distinct(values: list[_T] | None) -> list[_T] | None:
    """A list of options or sizes names each once: a repeat would only run the same work twice."""
    repeated = [v for i, v in enumerate(values) if v in values[:i]] if values else []
    if repeated:
        raise ValueError(f"each value may appear once; repeated: {repeated}")
    return values


Distinct = AfterValidator(_distinct)
# Seeds within numpy's and torch's range, with room for the offsets the engine adds per stream.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class _Model(BaseModel):
    """Every schema here. A figure that came out NaN or infinite (a user's model that computes
    log(0)) is written as the JSON string "NaN" / "Infinity" / "-Infinity", which reads back as
    the float: pydantic's default writes null, which a required float then refuses, so the job
    could not be read at all."""

    model_config = ConfigDict(ser_json_inf_nan="strings")


class _Strict(_Model):
    """Request bodies reject unknown fields so a typo is a 422 naming it, not a silent default."""

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- references to inputs


class ModelRef(_Strict):
    """A built-in zoo model (``{"zoo": "digits-cnn"}``) or an uploaded one (``{"id": "mdl_..."}``)."""

    zoo: ZooModel | None = None
    id: str | None = Field(default=None, pattern=r"^mdl_[0-9a-f]{32}$")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelRef:
        if (self.zoo is None) == (self.id is None):
            raise ValueError("give exactly one of `zoo` (a built-in model name) or `id`")
        return self

    def label(self) -> str:
        return f"zoo:{self.zoo}" if self.zoo else str(self.id)


class DatasetRef(_Strict):
    """A built-in dataset (``{"builtin": "digits-test"}``) or an uploaded one (``{"id": "dst_..."}``)."""

    builtin: BuiltinDataset | None = None
    id: str | None = Field(default=None, pattern=r"^dst_[0-9a-f]{32}$")

    @model_validator(mode="after")
    def _exactly_one(self) -> DatasetRef:
        if (self.builtin is None) == (self.id is None):
            raise ValueError("give exactly one of `builtin` (a built-in dataset name) or `id`")
        return self


# The built-in datasets each zoo model can read (char-gpt reads only its own text windows).
ZOO_DATASETS: dict[str, tuple[str, ...]] = {
    "digits-cnn": ("digits-test", "digits-calib"),
    "minilm-l6": ("sentences",),
    "char-gpt": (),
}


# The same for an uploaded model, by format: a Hugging Face folder takes token ids (the
# sentences, through its tokenizer); a .pt2 has no tokenizer. Checked by the API, which knows
# the upload's format (app/jobs.py).
UPLOAD_DATASETS: dict[str, tuple[str, ...]] = {"hf": ("sentences",),
                                               "pt2": ("digits-test", "digits-calib")}


def unreadable_builtin(model: str, fits: tuple[str, ...], builtin: str) -> str | None:
    """Why ``model`` (described) cannot read the built-in dataset ``builtin``, or None."""
    if builtin in fits:
        return None
    hint = f"use {' or '.join(fits)}" if fits else "leave `dataset` out to use its own"
    return f"dataset: {model} cannot read the built-in dataset {builtin}; {hint}, or upload a dataset"


def _zoo_reads(model: ModelRef, dataset: DatasetRef | None) -> None:
    """Refuse a zoo model with a built-in dataset it cannot read, before a worker loads both."""
    if model.zoo is None or dataset is None or dataset.builtin is None:
        return
    why = unreadable_builtin(f"zoo model {model.zoo}", ZOO_DATASETS[model.zoo], dataset.builtin)
    if why:
        raise ValueError(why)


# Metrics that score the data's labels (the rest compare with the float model's outputs).
LABELED_METRICS = ("accuracy", "perplexity")


def _labels_scored(model: ModelRef, dataset: DatasetRef | None, metric: str | None) -> None:
    """Refuse a metric that scores labels where a worker would find none to score: MiniLM
    returns pooled embeddings (no class logits), and the built-in sentences carry no labels."""
    if metric not in LABELED_METRICS:
        return
    if model.zoo == "minilm-l6":
        raise ValueError(f"metric {metric} scores labels against class logits, but zoo model "
                         "minilm-l6 returns pooled embeddings: give metric cosine or mse")
    if dataset is not None and dataset.builtin == "sentences":
        raise ValueError(f"metric {metric} scores labels, but the built-in dataset sentences has "
                         "none: give metric cosine or mse, or upload a labeled dataset")


# ---------------------------------------------------------------- job specs, one per kind


class BenchmarkSpec(_Strict):
    """Latency, throughput and peak memory of a model on the worker's device."""

    kind: Literal["benchmark"] = "benchmark"
    model: ModelRef
    dataset: DatasetRef | None = Field(
        default=None, description="Inputs are taken from this dataset; default: the model's own."
    )
    input_shape: list[Annotated[int, Field(ge=1, le=65536)]] | None = Field(
        default=None,
        max_length=8,
        description="Shape of one random float input, batch first (instead of a dataset); "
        "its first dimension is the batch, which batch_size then does not change.",
    )
    batch_size: int = Field(default=1, ge=1, le=4096)
    backend: Literal["torch"] = "torch"
    device: Device = "auto"
    warmup: int = Field(default=10, ge=0, le=10_000)
    repeats: int = Field(default=50, ge=1, le=100_000)
    threads: int | None = Field(default=None, ge=1, le=256, description="Intra-op threads.")
    per_layer: bool = Field(default=True, description="Also time each leaf module (torch only).")
    min_time_s: float = Field(
        default=0.0,
        ge=0,
        le=6 * 3600,
        description="Keep repeating until at least this much measuring time has passed (and at "
        "least `repeats` runs), like a benchmark harness's min-time; progress and cancellation "
        "are checked between runs.",
    )

    @model_validator(mode="after")
    def _input_fits(self) -> BenchmarkSpec:
        _zoo_reads(self.model, self.dataset)
        elements = math.prod(self.input_shape or ())
        if elements > MAX_INPUT_ELEMENTS:
            raise ValueError(
                f"input_shape {self.input_shape} has {elements:,} elements; at "
                f"most {MAX_INPUT_ELEMENTS:,} (1 GiB of float32) fit a worker: use a smaller batch "
                "or shape")
        return self


# ---- mixed precision

Metric = Literal["accuracy", "cosine", "mse", "perplexity"]
# int8: dynamic activations (quantized per call); int8-static: activations on calibrated grids.
Precision = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int8-static", "int8-weight", "int4"]
Ordering = Literal["augmented", "hessian", "random", "greedy", "uniform"]


class Budget(_Strict):
    """How much of the float model's quality the result must keep, on ``metric``.

    ``relative``: keep ``value`` of the baseline (0.999 = 99.9%; for a lower-is-better metric the
    baseline may grow by 0.1%). ``absolute``: lose at most ``value`` (in the metric's units)."""

    metric: Metric | None = Field(
        default=None,
        description="Default: accuracy for a classifier with labels, perplexity for a language "
                    "model with labels, else cosine to the float model.")
    mode: Literal["relative", "absolute"] = "relative"
    value: float = Field(default=0.999, ge=0, allow_inf_nan=False)
    higher_is_better: bool | None = Field(default=None, description="Default: from the metric.")

    @model_validator(mode="after")
    def _range(self) -> Budget:
        if self.mode == "relative" and not 0 < self.value <= 1:
            raise ValueError("a relative budget is a fraction in (0, 1], e.g. 0.999")
        if self.mode == "relative" and self.metric == "mse":
            # mse is measured against the float model's own outputs: its baseline is 0
            raise ValueError("metric mse is 0 for the float model by definition, so a relative "
                             "budget allows no change: give mode \"absolute\" and the mean "
                             "squared error you accept as value, e.g. 0.001")
        return self


class SensitivityOptions(_Strict):
    probes: int = Field(default=16, ge=1, le=1024, description="Hutchinson probes per layer.")
    calibration_samples: int = Field(default=128, ge=1, le=100_000)
    hessian: Literal["auto", "double-backward", "gauss-newton"] = Field(
        default="auto",
        description="How each probe multiplies by the Hessian: a Hessian-vector product by "
        "double backward, or, for the squared error to the float model's outputs (no labels), "
        "where the residual is zero and the Hessian equals 2/N J^T J, one backward of a random "
        "output-space vector (same trace, about a quarter of the time). `auto`: gauss-newton "
        "where it is exact (no labels), else double-backward.")
    dependency: Literal["none", "leave_one_out", "pairwise"] = Field(
        default="leave_one_out",
        description="Inter-layer term: loss change of restoring each layer in the fully quantized "
        "model; `pairwise` adds every pair (small models only).")
    dependency_weight: float = Field(default=1.0, ge=0, le=1e6, allow_inf_nan=False,
                                     description="lambda in h + lambda * d.")
    seed: Seed = 0


class SensitivitySpec(_Strict):
    """Per-layer sensitivity only: Hessian trace x perturbation, plus the inter-layer term."""

    kind: Literal["sensitivity"] = "sensitivity"
    model: ModelRef
    dataset: DatasetRef | None = Field(default=None, description="Evaluation data; default: "
                                       "the model's own (digits-test, sentences).")
    precision: Precision = Field(default="int8", description="The format whose noise is scored.")
    metric: Metric | None = None
    options: SensitivityOptions = Field(default_factory=SensitivityOptions)
    eval_samples: int = Field(default=512, ge=8, le=100_000)
    fan_out: bool = Field(
        default=True, description="Offer independent evaluations (the inter-layer terms, in "
        "pieces of 8 layers) to idle workers; each is still computed once.")

    @model_validator(mode="after")
    def _quantized(self) -> SensitivitySpec:
        _zoo_reads(self.model, self.dataset)
        _labels_scored(self.model, self.dataset, self.metric)
        if self.precision == "fp32":
            raise ValueError("precision: fp32 is the reference, so every layer's score would be "
                             "0; give the format to score (int8, int4, ...)")
        return self


class LoraRecovery(_Strict):
    """Low-rank adapters trained on held-out training data to win back what quantization lost.

    Each quantized layer gets W + B A / r, quantized as a whole (straight-through gradients)
    and trained so the quantized model's outputs match the float model's; the update is merged
    into the weight before quantization, so the deployed model has no extra ops. The search
    then bisects again, on the recovered metric, beyond the plain search's boundary."""

    rank: int = Field(default=8, ge=1, le=256)
    steps: int = Field(default=100, ge=1, le=100_000, description="Adam steps per config.")
    learning_rate: float = Field(default=1e-3, gt=0, le=1.0)
    batch_size: int = Field(default=32, ge=1, le=4096)
    samples: int = Field(default=512, ge=8, le=100_000, description="Training samples, from the "
                         "end of the data (disjoint from the evaluation samples where it holds "
                         "both; digits-cnn: its training split).")
    seed: Seed = 0


# What each backend has kernels for (a model's layers may still rule some out: Conv layers
# take only fp32 / bf16 / fp16 on the torch backends, fp8 needs a GPU with fp8 tensor cores).
BACKEND_PRECISIONS: dict[str, tuple[str, ...]] = {
    "onnxruntime-cpu": ("fp32", "int8", "int8-static", "int4"),
    "torch-cpu": ("fp32", "bf16", "fp16", "int8", "int8-weight", "int4"),
    "torch-cuda": ("fp32", "bf16", "fp16", "fp8", "int8", "int8-weight", "int4"),
}


class MixedPrecisionSpec(_Strict):
    """Per-layer precisions inside an accuracy budget, chosen on measured latency."""

    kind: Literal["mixed_precision"] = "mixed_precision"
    model: ModelRef
    dataset: DatasetRef | None = Field(default=None, description="Labeled or unlabeled "
                                       "evaluation data; default: the model's own.")
    budget: Budget = Field(default_factory=Budget)
    levels: Annotated[list[Precision] | None, Distinct] = Field(
        default=None, min_length=1, max_length=3,
        description="Precisions to descend through, most precise first (fp32 is the start). "
        "Default on onnxruntime-cpu: int8-static then int4 for models with convolutions "
        "(calibrated activations that stay uint8 from layer to layer), else int8 (activations "
        "quantized per call, which suits transformers) then int4. Default on torch-cpu / "
        "torch-cuda: bf16 then int8 (fp8 on GPUs with fp8 tensor cores).")
    int4_group_size: int = Field(default=32, ge=16, le=256, multiple_of=16)
    backend: Literal["onnxruntime-cpu", "torch-cpu", "torch-cuda"] = Field(
        default="onnxruntime-cpu",
        description="Where the frontier is realized and timed: ONNX Runtime's CPU kernels "
        "(artifact model.onnx), or PyTorch's kernels on the CPU or on a GPU worker (artifact "
        "model.safetensors with quantized tensors).")
    baselines: Annotated[list[Ordering], Distinct] = Field(
        default=["uniform", "hessian", "random"],
        description="Other searches run in the same job for comparison (greedy: small models).")
    sensitivity: SensitivityOptions = Field(default_factory=SensitivityOptions)
    eval_samples: int = Field(default=512, ge=8, le=100_000)
    batch_size: int = Field(default=8, ge=1, le=4096, description="Batch used for latency.")
    threads: int | None = Field(default=None, ge=1, le=256)
    warmup: int = Field(default=5, ge=0, le=1000)
    repeats: int = Field(default=30, ge=1, le=10_000)
    frontier_points: int = Field(default=6, ge=2, le=64, description="Sweep points per level.")
    latency_gate: bool = Field(
        default=True, description="Offer a precision to an op type only where the backend runs "
        "it faster than the level it replaces (fp32 for the first; measured on this model "
        "first).")
    lora: LoraRecovery | None = Field(
        default=None, description="Train low-rank adapters per evaluated config to recover "
        "accuracy, so the search can go further within the same budget (dynamic levels only).")
    fan_out: bool = Field(
        default=True, description="Offer independent evaluations (the inter-layer terms, in "
        "pieces of 8 layers, the baseline searches, and the frontier's re-measurements on the "
        "backend) to idle workers; each is still computed once, and latency is always timed by "
        "the job's own worker.")

    @model_validator(mode="after")
    def _levels_run_on_backend(self) -> MixedPrecisionSpec:
        _zoo_reads(self.model, self.dataset)
        _labels_scored(self.model, self.dataset, self.budget.metric)
        if self.lora is not None and "int8-static" in (self.levels or []):
            # static grids are calibrated on the weights the adapters change
            raise ValueError("LoRA recovery needs dynamic levels (its adapters change the "
                             "weights that static grids are calibrated on): give levels such "
                             'as ["int8", "int4"]')
        runs = BACKEND_PRECISIONS[self.backend]
        wrong = [p for p in self.levels or [] if p not in runs]
        if wrong:
            raise ValueError(f"backend {self.backend} does not run {', '.join(wrong)}; its "
                             f"precisions are {', '.join(runs)}")
        if self.backend == "onnxruntime-cpu" and {"int8", "int8-static"} <= set(self.levels or []):
            # ORT's dynamic pass re-quantizes the glue the static pass already quantized (a
            # Flatten between a static conv and a dynamic Linear): an invalid model
            raise ValueError("onnxruntime-cpu cannot mix int8 (dynamic) and int8-static layers "
                             "in one model: give one of them (with int4, say)")
        if (self.backend == "torch-cpu" and "int4" in (self.levels or [])
                and self.int4_group_size not in (32, 64, 128, 256)):
            raise ValueError("torch-cpu's int4 kernel takes int4_group_size 32, 64, 128 or 256")
        # ORT's blockwise quantizer (MatMulNBits) takes power-of-two blocks only; int4 is in
        # its default levels
        if (self.backend == "onnxruntime-cpu" and "int4" in (self.levels or ["int4"])
                and self.int4_group_size not in (16, 32, 64, 128, 256)):
            raise ValueError("onnxruntime-cpu's int4 kernel (MatMulNBits) takes int4_group_size "
                             "16, 32, 64, 128 or 256")
        return self


# ---- loss benchmark

LossImpl = Literal["torch", "chunked", "triton", "cce_torch_compile", "cce_triton", "liger"]


class LossBenchmarkSpec(_Strict):
    """Time and peak memory of linear + cross-entropy: materialized logits vs fused kernels."""

    kind: Literal["loss_benchmark"] = "loss_benchmark"
    n: int = Field(default=2048, ge=1, le=131072, description="Tokens.")
    d: int = Field(default=512, ge=1, le=16384, description="Hidden size.")
    vocab_sizes: Annotated[list[Annotated[int, Field(ge=2, le=1_048_576)]], Distinct] = Field(
        default=[32768, 131072], min_length=1, max_length=8)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    impls: Annotated[list[LossImpl] | None, Distinct] = Field(
        default=None, description="Default: torch, chunked, cce_torch_compile on CPU; adds "
        "triton, cce_triton and liger on a GPU; the peers only where installed (`pip install -e "
        "'.[bench]'`).")
    device: Device = "auto"
    repeats: int = Field(default=3, ge=1, le=100)


# ---- intrinsic dimension


class IntrinsicDimensionSpec(_Strict):
    """Train in random subspaces of growing dimension d; find d_int90 (Li et al., 2018)."""

    kind: Literal["intrinsic_dimension"] = "intrinsic_dimension"
    model: Literal["digits-mlp", "digits-cnn"] | ModelRef = Field(
        default="digits-mlp", description="Architecture trained from its seeded random init: "
        "a built-in one, or an uploaded classifier ({\"id\": \"mdl_...\"}, with `dataset`) whose "
        "layers are re-initialized: all Linear, Conv, norm and embedding layers of a Hugging "
        "Face folder; the Linear and Conv layers of a .pt2.")
    dataset: DatasetRef | None = Field(
        default=None, description="Labeled data for an uploaded model: the first 80% train, "
        "the last 20% measure accuracy. Built-in models use digits train / test.")
    projection: Literal["dense", "sparse", "fastfood"] = "fastfood"
    layer_scaling: bool = Field(
        default=False, description="Structure-aware variant: each parameter tensor also learns "
        "a scale of its share of P d (m more numbers trained and stored).")
    search: Literal["bisection", "grid"] = Field(
        default="bisection", description="Galloping + bisection over the grid, or the full grid.")
    grid: list[Annotated[int, Field(ge=1, le=10_000_000)]] | None = Field(
        default=None, max_length=1000, description="Candidate d values, ascending, at most "
        "the model's parameter count D (larger ones are refused); default 10, 20, ..., 100, "
        "150, ..., 1000, 1250, ..., 3000, cut at D.")
    threshold: float = Field(default=0.9, gt=0, le=1, description="Fraction of full accuracy.")
    seeds: Annotated[list[Seed], Distinct] = Field(default=[0], min_length=1, max_length=8,
                             description="One search per seed (theta0 and projection).")
    epochs: int = Field(default=20, ge=1, le=1000)
    lr: float = Field(default=0.01, gt=0, le=1)
    fan_out: bool = Field(
        default=True, description="Offer independent training runs (other seeds' searches, or "
        "every grid point) to idle workers; each run is still computed once.")
    device: Device = Field(
        default="auto", description="Where training runs: auto (the worker's GPU if it has one, "
        "else its CPU), cpu, or cuda (a GPU worker; the Fastfood projection then runs the Triton "
        "FWHT kernel). theta0 and P are drawn on the CPU either way, so an artifact rebuilds "
        "the same on any device.")

    @model_validator(mode="after")
    def _ascending(self) -> IntrinsicDimensionSpec:
        if self.grid is not None and self.grid != sorted(set(self.grid)):
            raise ValueError("grid must be strictly ascending")
        if isinstance(self.model, ModelRef) and self.model.id is None:
            raise ValueError("model: give a built-in architecture name (digits-mlp, digits-cnn) "
                             "or an uploaded model's id; zoo models are not re-initialized here")
        if isinstance(self.model, ModelRef) and self.dataset is None:
            raise ValueError("an uploaded model needs a labeled `dataset` to train on")
        if not isinstance(self.model, ModelRef) and self.dataset is not None:
            # the built-in architectures train on digits train / test whatever `dataset` says:
            # accepting one would report digits figures as if they were the user's data
            raise ValueError(f"dataset: the built-in {self.model} trains and measures on digits "
                             "train / test; leave `dataset` out, or upload a model "
                             "({\"id\": \"mdl_...\"}) to train on your own data")
        return self


# ---- spiking


class SpikingSpec(_Strict):
    """A spiking model next to its non-spiking twin: quality, operations, estimated energy."""

    kind: Literal["spiking"] = "spiking"
    model: Literal["digits-cnn", "char-rwkv"] = Field(
        default="digits-cnn", description="digits-cnn: the zoo CNN converted (ReLU -> LIF) and "
        "fine-tuned; char-rwkv: a character RWKV and its SpikeGPT twin, both trained here.")
    time_steps: int = Field(default=4, ge=1, le=64,
                            description="digits-cnn: time steps per input (rate coding).")
    beta: float | None = Field(
        default=None, gt=0, le=1, description="Membrane decay per step (1: integrate-and-fire). "
        "Default 0.9 for digits-cnn, whose steps repeat one input; 0.1 for char-rwkv, whose "
        "steps are successive characters (held-out bits/char after 300 steps: 4.80 at 0.9, "
        "3.57 at 0.5, 3.13 at 0.1).")
    epochs: int = Field(default=5, ge=0, le=200,
                        description="digits-cnn: surrogate-gradient fine-tuning epochs.")
    steps: int = Field(default=600, ge=10, le=20000,
                       description="char-rwkv: training steps of each of the two models.")
    samples: int = Field(default=2, ge=0, le=8, description="char-rwkv: text samples per model.")
    sample_length: int = Field(default=160, ge=1, le=2000)
    seed: Seed = 0
    device: Device = Field(
        default="auto", description="Where training, evaluation and timing run: auto (the "
        "worker's GPU if it has one, else its CPU), cpu, or cuda (a GPU worker; the LIF "
        "neurons then run the fused Triton kernel).")

    def decay(self) -> float:
        if self.beta is not None:
            return self.beta
        return 0.1 if self.model == "char-rwkv" else 0.9


# ---- few-step diffusion distillation


class FewStepDistillSpec(_Strict):
    """Distil the digits diffusion teacher into few-step students: SLAM vs consistency
    distillation, each sampled at every step count in `steps`."""

    kind: Literal["few_step_distill"] = "few_step_distill"
    methods: Annotated[list[Literal["slam", "cd"]], Distinct] = Field(
        default=["slam", "cd"], min_length=1, max_length=2)
    steps: Annotated[list[Annotated[int, Field(ge=1, le=16)]], Distinct] = Field(
        default=[1, 2, 4], min_length=1, max_length=6)
    teacher_steps: int = Field(default=100, ge=2, le=1000,
                               description="DDIM steps of the teacher's reference sampler.")
    student: Literal["full", "lora"] = Field(
        default="full", description="Fine-tune a full copy of the teacher, or LoRA adapters "
        "on its frozen Linear layers (plus the new gamma branch).")
    rank: int = Field(default=8, ge=1, le=256, description="LoRA rank.")
    iterations: int = Field(default=2000, ge=1, le=100_000)
    lr: float | None = Field(default=None, gt=0, le=1,
                             description="Adam learning rate; default 2e-4 full, 1e-3 LoRA.")
    grid_points: int = Field(default=32, ge=2, le=1000, description="N of the time grid.")
    skip: int = Field(default=32, ge=1, le=1000, description=(
        "Grid steps between t and s, s clamped at the grid's end. The default (= grid_points) "
        "maps every t to the end: the long hops where SLAM beats CD "
        "(benchmarks/results/few_step_ablation_cpu.md); short hops favour CD."))
    teacher_substeps: int = Field(default=32, ge=1, le=100,
                                  description="Teacher DDIM steps from t to s (LCM uses 1).")
    samples_per_class: int = Field(default=100, ge=2, le=1000,
                                   description="Generated per digit class for the metrics.")
    seed: Seed = 0
    device: Device = Field(
        default="auto", description="Where the teacher (if not cached yet), the students and "
        "the samplers run: auto (the worker's GPU if it has one, else its CPU), cpu, or cuda "
        "(a GPU worker).")

    @model_validator(mode="after")
    def _skip_fits(self) -> FewStepDistillSpec:
        if self.skip > self.grid_points:
            raise ValueError("skip must be at most grid_points")
        return self


# Every job spec model; each new kind joins this union (and JobKind) with its issue.
AnySpec = (BenchmarkSpec | SensitivitySpec | MixedPrecisionSpec | LossBenchmarkSpec
           | IntrinsicDimensionSpec | SpikingSpec | FewStepDistillSpec)
JobSpec = Annotated[AnySpec, Field(discriminator="kind")]


_SPEC_KINDS: dict[str, type[BaseModel]] = {
    cls.model_fields["kind"].default: cls for cls in get_args(AnySpec)}


def stored_spec(raw: Any) -> BaseModel | None:
    """A stored spec of a kind of today's without the checks made when a job is created: each
    part that still validates is validated, the rest kept as stored, missing fields take their
    defaults. None for what names no kind of today's."""
    cls = _SPEC_KINDS.get(str(raw.get("kind"))) if isinstance(raw, dict) else None
    return None if cls is None else _as_stored(cls, raw)


def _as_stored(cls: type[BaseModel], raw: dict[str, Any]) -> BaseModel:
    values = {}
    for name, field in cls.model_fields.items():
        if name not in raw:
            continue  # model_construct fills in the default
        value = raw[name]
        sub = _model_in(field.annotation)
        if isinstance(value, dict) and sub is not None:
            try:
                value = sub.model_validate(value)
            except ValidationError:
                value = _as_stored(sub, value)
        values[name] = value
    return cls.model_construct(**values)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model class a field holds (alone, or in a union with None or literals)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, UnionType):
        found = [m for a in get_args(annotation) if (m := _model_in(a)) is not None]
        return found[0] if len(found) == 1 else None
    return None


class JobCreate(_Strict):
    spec: JobSpec
    name: str | None = Field(default=None, max_length=200)


# ---------------------------------------------------------------- results, one per kind


class Environment(_Model):
    """Where a figure was measured."""

    device: str
    device_name: str
    threads: int
    versions: dict[str, str]
    host: str
    allocator: str = "default"  # CPU memory allocator settings the timings ran under


class LatencyStats(_Model):
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    repeats: int
    warmup: int


class LayerLatency(_Model):
    name: str
    type: str
    median_ms: float
    share: float = Field(description="Fraction of the summed per-layer medians.")


class BenchmarkResult(_Model):
    kind: Literal["benchmark"] = "benchmark"
    model: str
    backend: str
    batch_size: int
    input_shapes: list[list[int]]
    parameters: int
    model_bytes: int
    latency: LatencyStats
    throughput_per_s: float = Field(description="Samples per second at the median latency.")
    peak_memory_bytes: int
    memory_method: str
    per_layer: list[LayerLatency]
    method: str
    environment: Environment


class LayerSensitivity(_Model):
    name: str
    type: str
    parameters: int
    hessian_trace: float = Field(description="Hutchinson estimate of Tr(H) of the loss w.r.t. "
                                 "the layer's weight.")
    perturbation: float = Field(description="||Q(W) - W||^2 for the scored format.")
    hessian_term: float = Field(description="Tr(H) / n * ||Q(W) - W||^2.")
    dependency_term: float | None = Field(default=None, description="Loss of the fully "
                                          "quantized model minus the loss with this layer restored.")
    score: float = Field(description="Normalized hessian term + lambda x normalized dependency.")
    rank: int = Field(description="0 = least sensitive.")


class SensitivityResult(_Model):
    kind: Literal["sensitivity"] = "sensitivity"
    model: str
    precision: str
    metric: str
    loss: str
    hessian: str = Field(default="double-backward",
                         description="How Tr(H) was estimated: double-backward or gauss-newton.")
    layers: list[LayerSensitivity]
    pairwise: dict[str, float] | None = None
    evaluations: int
    computed_by: dict[str, int] = Field(
        default_factory=dict, description="Worker -> evaluations it computed for this run of "
        "the job (the job's own worker and those that took its pieces).")
    seconds: float
    environment: Environment


class ConfigPoint(_Model):
    """One per-layer configuration with what it scored."""

    label: str
    config: dict[str, str] = Field(description="Layer -> precision; layers not listed are fp32.")
    simulated_metric: float | None = None
    deployed_metric: float | None = Field(default=None, description="Re-measured on the backend.")
    latency_ms: float | None = Field(default=None, description="Median on the backend.")
    latency_p90_ms: float | None = None
    size_bytes: int | None = None
    within_budget: bool | None = None
    pareto: bool = False


class SearchRun(_Model):
    ordering: str
    order: list[str] = Field(description="Layers, least sensitive first.")
    boundaries: dict[str, int] = Field(description="Precision -> layers moved to it.")
    result: ConfigPoint
    evaluations: int
    seconds: float


class LoraNorm(_Model):
    """The quantities the LoRA-limits paper bounds: largest entries of a layer's inputs, frozen
    weight and adapters."""

    layer: str
    input_max: float
    weight_max: float
    a_max: float
    b_max: float
    update_fro: float = Field(description="Frobenius norm of the learned update (alpha/r) B A.")


class LoraRecoveryReport(_Model):
    """What recovery bought: the recovered search next to the plain one, both deployed."""

    options: LoraRecovery
    plain: ConfigPoint = Field(description="The plain search's result (ours, no adapters).")
    recovered: ConfigPoint = Field(description="The recovered search's result, adapters merged.")
    trainings: int = Field(description="Adapter trainings run (one per config evaluated).")
    train_seconds: float
    loss_before: float = Field(
        description="The recovered config's training loss before the adapters learn (B = 0): "
        "the squared error of its outputs to the float model's, summed per sample and averaged, "
        "on the adapters' training samples.")
    loss_after: float = Field(description="The same loss after training.")
    norms: list[LoraNorm] = Field(description="Per adapted layer of the recovered config.")


class MixedPrecisionResult(_Model):
    kind: Literal["mixed_precision"] = "mixed_precision"
    model: str
    backend: str
    metric: str
    higher_is_better: bool
    budget: Budget
    threshold: float
    baseline: ConfigPoint
    chosen: ConfigPoint
    why: str
    frontier: list[ConfigPoint]
    searches: list[SearchRun]
    sensitivity: list[LayerSensitivity]
    evaluations: int
    computed_by: dict[str, int] = Field(
        default_factory=dict, description="Worker -> evaluations it computed for this run of "
        "the job (the job's own worker and those that took its pieces).")
    stage_seconds: dict[str, float]
    latency_gate: dict[str, float] = Field(
        default_factory=dict, description="'precision:op' -> latency with all such layers "
        "moved down to it / latency at the level above (fp32 for the first level, else every "
        "layer at the deepest level kept so far); >= 1 means not offered to the search. "
        "int8-static is gated as a whole ('int8-static:all'): its gain comes from chains.")
    levels: list[str] = Field(
        default_factory=list, description="The precision levels offered to this model: those "
        "the backend runs on at least one of its layers, most precise first, before the latency "
        "gate (`latency_gate` says what it kept).")
    latency_reduction: float = Field(description="1 - chosen latency / fp32 latency (backend).")
    lora: LoraRecoveryReport | None = None
    method: str
    hessian: str = Field(default="double-backward",
                         description="How Tr(H) was estimated: double-backward or gauss-newton "
                         "(none where the latency gate offered no layer).")
    environment: Environment


class LossRow(_Model):
    impl: str
    n: int
    d: int
    v: int
    dtype: str
    device: str
    time_ms: float | None
    peak_extra_bytes: int | None
    loss: float | None
    max_abs_grad_diff: float | None = Field(
        default=None, description="Against the materialized fp32 gradients on the same inputs.")
    error: str | None = None


class LossBenchmarkResult(_Model):
    kind: Literal["loss_benchmark"] = "loss_benchmark"
    rows: list[LossRow]
    table: str = Field(description="The rows as a Markdown table with ratios to `torch`.")
    method: str
    environment: Environment


class CurvePoint(_Model):
    d: int
    seed: int
    accuracy: float


class IntrinsicDimensionResult(_Model):
    kind: Literal["intrinsic_dimension"] = "intrinsic_dimension"
    model: str
    projection: str
    parameters: int = Field(description="D, the native parameter count.")
    full_accuracy: float
    target: float
    d_int90: int | None = Field(description=(
        "The smallest passing d that more than half of the seeds reach: the upper median over "
        "seeds, a seed that never passed counting as infinite (None unless more than half "
        "passed)."))
    d_int90_per_seed: list[int | None]
    curve: list[CurvePoint]
    training_runs: int
    computed_by: dict[str, int] = Field(
        default_factory=dict, description="Worker -> training runs it computed for this job.")
    layer_scaling: bool = False
    reinitialized_parameters: int | None = Field(
        default=None, description="Uploaded models: parameters redrawn for theta0; the rest "
        "keep their uploaded values.")
    rebuilt_accuracy: float | None = Field(
        default=None, description="Accuracy of the model rebuilt from the artifact, "
        "on the CPU whatever device trained it. The artifact is the first of `seeds` at its own "
        "d_int90 (None, and no artifact, where that seed never passed).")
    compression_ratio: float | None = Field(
        default=None, description="fp32 bytes of the full model / bytes of the artifact.")
    seconds: float
    method: str
    environment: Environment


class SpikingLayer(_Model):
    name: str
    input: Literal["spikes", "analog"]
    input_spike_rate: float | None = Field(description="Active fraction of its spike inputs.")
    twin_macs: int
    spiking_acs: int
    spiking_macs: int


class TextSample(_Model):
    prompt: str
    twin: str
    spiking: str


class SpikingResult(_Model):
    kind: Literal["spiking"] = "spiking"
    model: str
    metric: Literal["accuracy", "bits_per_char"]
    twin_quality: float
    spiking_quality: float
    quality_gap: float = Field(description="How much worse the spiking model is, in the metric's "
                               "units (accuracy: twin - spiking; bits/char: spiking - twin).")
    parameters: int = Field(description="Of each model: the twins have the same parameters.")
    per: Literal["sample", "token"] = Field(description="Operations and energy are per this.")
    time_steps: int | None
    layers: list[SpikingLayer]
    spike_rates: dict[str, float] = Field(description="LIF layer -> fraction of neuron-steps "
                                          "that spiked: the sparsity the operation count rests on.")
    twin_macs: float
    spiking_acs: float
    spiking_macs: float
    neuron_updates: float = Field(description="LIF membrane updates (spiking model only).")
    op_ratio: float = Field(description="Twin synaptic operations / spiking synaptic operations.")
    energy_twin_pj: float
    energy_spiking_pj: float
    energy_ratio: float
    energy_ratio_with_neurons: float = Field(
        description="The same, charging every LIF update as a multiply-accumulate.")
    energy_note: str
    wall_ms_twin: float = Field(description="Wall time per sample / token here (PyTorch).")
    wall_ms_spiking: float
    samples: list[TextSample] = Field(default_factory=list)
    train_seconds: float
    seconds: float
    method: str
    environment: Environment


class QualityRow(_Model):
    method: Literal["teacher", "slam", "cd", "real"]
    steps: int | None = Field(description=(
        "Sampling steps per sample (None: real data). A student's are its network evaluations; "
        "the teacher's are DDIM steps, after which it denoises once more at the grid's end: "
        "steps + 1 network evaluations."))
    frechet_distance: float = Field(description="In digits-cnn features, against digits test.")
    class_accuracy: float = Field(description="digits-cnn accuracy on the conditioning labels.")
    ms_per_sample: float | None


class StudentInfo(_Model):
    method: Literal["slam", "cd"]
    seconds: float
    final_loss: float
    trainable_parameters: int
    lora: list[LoraNorm] = Field(default_factory=list)


class FewStepDistillResult(_Model):
    kind: Literal["few_step_distill"] = "few_step_distill"
    rows: list[QualityRow]
    students: list[StudentInfo]
    teacher_parameters: int
    teacher_train_seconds: float | None
    reference: str
    summary: str
    seconds: float
    method: str
    environment: Environment


JobResult = Annotated[BenchmarkResult | SensitivityResult | MixedPrecisionResult
                      | LossBenchmarkResult | IntrinsicDimensionResult | SpikingResult
                      | FewStepDistillResult,
                      Field(discriminator="kind")]


# ---------------------------------------------------------------- job records


class Progress(_Model):
    stage: str = "queued"
    fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    message: str = ""
    updated_at: datetime | None = None


class ErrorInfo(_Model):
    type: str
    message: str


class ArtifactInfo(_Model):
    name: str
    size: int
    sha256: str
    media_type: str
    created_at: datetime


class RunAttempt(_Model):
    attempt: int
    worker: str
    started_at: datetime
    finished_at: datetime | None = None
    outcome: Literal["running", "succeeded", "failed", "cancelled", "lost"] = "running"


class Job(_Model):
    id: str
    kind: JobKind
    name: str | None = None
    state: JobState
    spec: JobSpec
    queue: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: Progress
    result: JobResult | None = None
    error: ErrorInfo | None = None
    artifacts: list[ArtifactInfo] = Field(default_factory=list)
    attempts: int = Field(default=0, description="How many times a worker started this job.")
    runs: list[RunAttempt] = Field(default_factory=list)
    cancel_requested: bool = False

    @field_validator("spec", mode="wrap")
    @classmethod
    def _spec_as_stored(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """A job's spec as it was accepted: the checks on specs are for new jobs (JobCreate).
        One that a check added or tightened since refuses (its job was accepted then, and most
        likely failed in its worker) is kept as stored, by :func:`stored_spec`: read through
        today's checks, its record answered 500 to every request that listed it."""
        if isinstance(value, AnySpec):
            return value
        try:
            return handler(value)
        except ValidationError:
            kept = stored_spec(value)
            if kept is None:
                raise
            return kept

    @property
    def retried(self) -> bool:
        return self.attempts > 1

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES


JOB_LIST_SCAN_LIMIT = 1000
"""Index entries one GET /v1/jobs reads at most (app.jobs.list_jobs): a filter that few of a
tenant's jobs match would otherwise read the whole index in one request."""


class JobPage(_Model):
    items: list[Job]
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` for the next page; null when no more jobs "
        "match."
    )
    partial: bool = Field(
        default=False, description="The server stopped after reading its bound of jobs "
        f"({JOB_LIST_SCAN_LIMIT} per request) before it knew whether more match the filters: "
        "the page may hold fewer than `limit` items, even none; follow `next_cursor` to read "
        "on. Otherwise a page with a `next_cursor` holds `limit` matching jobs.")


class JobEvent(_Model):
    """One Server-Sent Event of a job's stream; ``id`` is the SSE id, usable as Last-Event-ID."""

    id: str
    type: Literal["state", "progress", "log"]
    job_id: str
    at: datetime
    state: JobState | None = None
    progress: Progress | None = None
    message: str | None = None


class JobLog(_Model):
    job_id: str
    lines: list[str]


# ---------------------------------------------------------------- uploaded inputs

ModelFormat = Literal["pt2", "hf"]
DatasetFormat = Literal["npz", "safetensors"]


class TensorInfo(_Model):
    shape: list[int]
    dtype: str


class ModelInfo(_Model):
    id: str
    name: str
    format: ModelFormat
    size: int
    sha256: str
    created_at: datetime
    details: dict[str, Any] = Field(default_factory=dict)


class DatasetInfo(_Model):
    id: str
    name: str
    format: DatasetFormat
    size: int
    sha256: str
    created_at: datetime
    tensors: dict[str, TensorInfo]


class ModelList(_Model):
    items: list[ModelInfo]
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` for the next page; null on the last page."
    )


class DatasetList(_Model):
    items: list[DatasetInfo]
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` for the next page; null on the last page."
    )


class Deleted(_Model):
    """The answer to a DELETE: what is gone, and how many stored files went with it."""

    id: str
    object: Literal["job", "model", "dataset"]
    deleted: Literal[True] = True
    files_removed: int = Field(description="Objects removed from the object store (a job's "
                               "artifacts and logs; an upload's file).")


# ---------------------------------------------------------------- service


class ErrorBody(_Model):
    """Every 4xx/5xx body: ``{"error": {"type": ..., "message": ...}}``."""

    class Detail(BaseModel):
        type: str
        message: str
        fields: list[dict[str, Any]] | None = None

    error: Detail


class Health(_Model):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


class ApiKeyCreated(_Model):
    tenant: str
    name: str
    key: str = Field(description="Shown once; only its hash is stored.")
