"""From a job spec to a :class:`QuantTask`: load the model, split evaluation and calibration
data, pick the metric."""

from __future__ import annotations

import torch

from app.schemas import DatasetRef, ModelRef
from workers.engine import datasets, models
from workers.engine.context import JobContext, UserError
from workers.engine.datasets import TensorData
from workers.engine.quant.task import LABELED, QuantTask, quantizable_layers


def _split(data: TensorData, names: list[str], n_eval: int, n_calib: int
           ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None,
                      tuple[torch.Tensor, ...], torch.Tensor | None]:
    """Evaluation from the front, calibration from the back; they overlap only when the data
    is too small to hold both (the result says how many samples each used)."""
    tensors = data.ordered(names)
    n = len(data)
    ev = min(n_eval, n)
    cb = min(n_calib, n)
    labels = data.labels
    return (tuple(t[:ev] for t in tensors), labels[:ev] if labels is not None else None,
            tuple(t[n - cb:] for t in tensors), labels[n - cb:] if labels is not None else None)


def _warn_overlap(ctx: JobContext, n: int, n_eval: int, n_calib: int, n_train: int) -> None:
    """Evaluation comes from the front, calibration and LoRA training from the back: on data
    too small to hold them apart they share samples, which the job still runs with but says."""
    ev = min(n_eval, n)
    for what, k, effect in (
            ("calibration", min(n_calib, n), "the sensitivities and static scales are fitted "
             "on samples the metric is then measured on"),
            ("LoRA training", min(n_train, n), "the recovered metric is measured on samples "
             "the adapters trained on, so it is optimistic")):
        shared = ev + k - n
        if k and shared > 0:
            ctx.log.warning("%s uses %d of the %d evaluation samples (the data has %d; "
                            "%d would keep them apart): %s", what, shared, ev, n, ev + k, effect)


def build_task(model_ref: ModelRef, dataset_ref: DatasetRef | None, metric: str | None,
               eval_samples: int, calib_samples: int, ctx: JobContext, train_samples: int = 0
               ) -> tuple[models.LoadedModel, QuantTask]:
    """With ``train_samples``, the task also holds training data for LoRA recovery, taken
    from the end of the data like the calibration samples."""
    loaded = models.load_model(model_ref, ctx)
    train_x: tuple[torch.Tensor, ...] | None = None
    if dataset_ref is not None:
        data = models.load_dataset(dataset_ref, ctx, loaded)
        _warn_overlap(ctx, len(data), eval_samples, calib_samples, train_samples)
        ev_x, ev_y, cb_x, cb_y = _split(data, loaded.input_names, eval_samples, calib_samples)
        if train_samples:
            train_x = _split(data, loaded.input_names, 0, train_samples)[2]
    elif loaded.name == "digits-cnn":  # its own held-out splits, not slices of one set
        test = datasets.digits("test").take(eval_samples)
        calib = datasets.digits("calib").take(calib_samples)
        ev_x, ev_y = test.ordered(loaded.input_names), test.labels
        cb_x, cb_y = calib.ordered(loaded.input_names), calib.labels
        if train_samples:
            train_x = datasets.digits("train").take(train_samples).ordered(loaded.input_names)
    else:
        _warn_overlap(ctx, len(loaded.default_data), eval_samples, calib_samples, train_samples)
        ev_x, ev_y, cb_x, cb_y = _split(loaded.default_data, loaded.input_names, eval_samples,
                                        calib_samples)
        if train_samples:
            train_x = _split(loaded.default_data, loaded.input_names, 0, train_samples)[2]
    if metric is None:
        labeled = ev_y is not None
        metric = ("accuracy" if labeled and loaded.task == "classification" else
                  "perplexity" if labeled and loaded.task == "language_model" else "cosine")
        if labeled and metric == "cosine":  # say so: the user gave labels for a reason
            ctx.log.warning("the dataset's labels are not scored: this model's outputs are not "
                            "[batch, classes] logits, so the metric is cosine to the float model; "
                            + ("an encoder's pooled embeddings cannot score labels (upload a "
                               "*ForSequenceClassification model for that)"
                               if loaded.tokenizer is not None else
                               "give metric 'perplexity' (token logits) or 'accuracy' to score "
                               "them"))
    if metric in LABELED and loaded.tokenizer is not None and loaded.task == "embedding":
        raise UserError(f"metric {metric!r} scores class logits, but this model returns pooled "
                        "embeddings (a Hugging Face encoder without a classification head): use "
                        "metric 'cosine' or 'mse', or upload a *ForSequenceClassification model")
    module = loaded.for_inference(torch.device("cpu"))
    layers = quantizable_layers(module)
    if not layers:
        raise UserError("the model has no Linear or Conv layers to quantize")
    batch = 64 if loaded.name == "digits-cnn" else 32
    task = QuantTask(module, layers, ev_x, ev_y, cb_x, cb_y, metric, batch_size=batch, ctx=ctx,
                     train_inputs=train_x, exported_for=loaded.info.get("inputs"))
    return loaded, task
