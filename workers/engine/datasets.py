"""Datasets as named tensors: the built-in ones (made from what ships in packages) and uploads."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_safetensors_np

from app.filechecks import IGNORE_INDEX
from workers.engine.context import UserError

DIGITS_TEST_FRACTION = 0.2
DIGITS_CALIB_SIZE = 256
SPLIT_SEED = 0


@dataclass
class TensorData:
    """Inputs by name (first dimension = samples) and optional integer labels."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def ordered(self, names: list[str]) -> tuple[torch.Tensor, ...]:
        if len(names) == 1 and names[0] not in self.inputs and "x" in self.inputs:
            return (self.inputs["x"],)
        missing = [n for n in names if n not in self.inputs]
        if missing:
            raise UserError(f"dataset has tensors {sorted(self.inputs)}, but the model needs "
                            f"inputs {names} (missing {missing})")
        return tuple(self.inputs[n] for n in names)

    def take(self, n: int) -> TensorData:
        return TensorData({k: v[:n] for k, v in self.inputs.items()},
                          None if self.labels is None else self.labels[:n])

    def batches(self, names: list[str], batch_size: int
                ) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor | None]]:
        tensors = self.ordered(names)
        for i in range(0, len(self), batch_size):
            labels = None if self.labels is None else self.labels[i:i + batch_size]
            yield tuple(t[i:i + batch_size] for t in tensors), labels


@lru_cache(maxsize=1)
def digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 8x8 digits, scaled to [0, 1], split deterministically."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    y = d.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    return {
        "train": (x_train, y_train),
        "test": (x_test, y_test),
        "calib": (x_train[:DIGITS_CALIB_SIZE], y_train[:DIGITS_CALIB_SIZE]),
    }


def digits(split: str) -> TensorData:
    x, y = digits_splits()[split]
    return TensorData({"x": torch.from_numpy(x.copy())}, torch.from_numpy(y.copy()))


_STDLIB_FOR_TEXT = ("json", "os", "re", "collections", "itertools", "functools", "pathlib",
                    "textwrap", "string", "math", "random", "datetime", "statistics", "shutil",
                    "logging", "argparse", "subprocess", "threading", "heapq", "bisect", "zipfile",
                    "csv", "decimal", "fractions", "typing", "inspect", "difflib", "tempfile")


@lru_cache(maxsize=1)
def sentences(limit: int = 1024) -> list[str]:
    """English sentences from the docstrings of standard-library modules: text every machine
    with Python has, so no download is needed. 1024 by default: evaluation takes 512 from the
    front, calibration and LoRA training come from the back, disjoint."""
    import importlib

    seen: set[str] = set()
    out: list[str] = []
    for mod_name in _STDLIB_FOR_TEXT:
        mod = importlib.import_module(mod_name)
        for _, obj in sorted(inspect.getmembers(mod), key=lambda kv: kv[0]):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if not doc:
                continue
            text = " ".join(doc.split())
            for s in re.split(r"(?<=[.!?])\s+", text):
                if 30 <= len(s) <= 200 and s[0].isupper() and s not in seen and ">>>" not in s:
                    seen.add(s)
                    out.append(s)
    return out[:limit]


def load_uploaded(path: Path, fmt: str) -> TensorData:
    if fmt == "npz":
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    else:
        arrays = load_safetensors_np(str(path))
    labels = arrays.pop("y", None)
    if labels is None:
        labels = arrays.pop("labels", None)
    if not arrays:
        raise UserError("the dataset has no input tensors (only labels)")
    inputs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    for k, v in inputs.items():
        if v.dtype == torch.float64:
            inputs[k] = v.float()
    n = {int(v.shape[0]) if v.dim() else 0 for v in inputs.values()}
    if len(n) != 1 or (labels is not None and (labels.ndim == 0 or int(labels.shape[0]) not in n)):
        raise UserError("all dataset tensors must have the same number of samples (first dim)")
    if n == {0}:
        raise UserError("the dataset holds 0 samples")
    for k, v in inputs.items():
        # NaN in, NaN out: a metric of NaN compares false with everything, and quantization
        # grids fail on it; refuse rather than report figures of nothing. (Not inf: -inf is
        # how an additive attention mask says "never".)
        if v.is_floating_point() and bool(torch.isnan(v).any()):
            raise UserError(f"dataset array {k!r} holds {int(torch.isnan(v).sum())} NaN values; "
                            "give numbers")
    if labels is not None and labels.dtype.kind not in "iub":
        # .long() would truncate 0.5 to 0 and score a model against labels nobody gave
        raise UserError(f"the labels must be integer class or token ids, not {labels.dtype}; "
                        "store them as int64, or leave them out")
    return TensorData(inputs, None if labels is None else torch.from_numpy(labels).long())


def check_class_labels(labels: torch.Tensor, outputs: torch.Tensor, n: int,
                       skip_ignored: bool) -> None:
    """Labels scored against a model's outputs [n, ..., classes]: one class (or token) id per
    output row, in range (``IGNORE_INDEX`` too where ``skip_ignored``: cross-entropy and
    accuracy skip it). Else cross-entropy fails deep in a job, or accuracy compares nonsense."""
    want = [n, *outputs.shape[1:-1]]
    if list(labels.shape) != want:
        raise UserError(f"the labels have shape {list(labels.shape)}; the model's outputs "
                        f"{list(outputs.shape)} need one id per output row, shape {want}")
    classes = int(outputs.shape[-1])
    scored = labels[labels != IGNORE_INDEX] if skip_ignored else labels
    if skip_ignored and labels.numel() and not scored.numel():
        raise UserError(f"every label is {IGNORE_INDEX} (skip): nothing would be scored")
    if not skip_ignored and bool((labels == IGNORE_INDEX).any()):
        raise UserError(f"this job scores every label: drop the samples labelled {IGNORE_INDEX}")
    if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= classes):
        skip = f", or {IGNORE_INDEX} to skip a position" if skip_ignored else ""
        raise UserError(f"the labels must lie in [0, {classes}) for a model with {classes} "
                        f"outputs{skip}; found {int(scored.min())} to {int(scored.max())}")
