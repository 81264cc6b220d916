"""A user's dataset that does not fit the user's model is refused before the search, with what
to fix, instead of failing deep inside it or scoring against labels nobody gave."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from workers.engine.context import UserError
from workers.engine.datasets import load_uploaded
from workers.engine.quant.task import QuantTask, quantizable_layers, threshold


def _task(x: torch.Tensor, y: torch.Tensor | None, metric: str = "accuracy") -> QuantTask:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    return QuantTask(model, quantizable_layers(model), (x,), y, (x,), y, metric)


def test_fitting_data_builds_a_task() -> None:
    task = _task(torch.randn(8, 1, 8, 8), torch.arange(8) % 10)
    assert task.calib_reference.shape == (8, 10)


def test_inputs_the_model_cannot_take_are_refused() -> None:
    with pytest.raises(UserError, match=r"does not run on the dataset's inputs \[\[4, 2\]\]"):
        _task(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("label", [99, -3])
def test_labels_outside_the_outputs_are_refused(label: int) -> None:
    y = torch.zeros(8, dtype=torch.long)
    y[3] = label
    with pytest.raises(UserError, match=r"must lie in \[0, 10\)"):
        _task(torch.randn(8, 1, 8, 8), y)


def test_labels_of_the_wrong_shape_are_refused() -> None:
    with pytest.raises(UserError, match=r"labels have shape \[8, 2\].*shape \[8\]"):
        _task(torch.randn(8, 1, 8, 8), torch.zeros(8, 2, dtype=torch.long))


def test_the_ignore_index_is_skipped_by_the_checks_and_by_accuracy() -> None:
    x = torch.randn(8, 1, 8, 8)
    predicted = _task(x, torch.zeros(8, dtype=torch.long)).calib_reference.argmax(-1)
    y = predicted.clone()
    y[:3] = -100  # padding: not scored
    task = _task(x, y)
    assert task.evaluate({}) == 1.0  # 5 of 5 scored positions right, not 5 of 8
    y[0] = -101
    with pytest.raises(UserError, match=r"or -100 to skip a position; found -101"):
        _task(x, y)


def test_unlabeled_metrics_ignore_labels() -> None:
    _task(torch.randn(8, 1, 8, 8), torch.full((8,), 99), metric="cosine")


def _npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_float_labels_are_refused_not_truncated(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=np.zeros((4, 1, 8, 8), np.float32), y=np.full(4, 0.5))
    with pytest.raises(UserError, match="integer class or token ids, not float64"):
        load_uploaded(path, "npz")


def test_an_empty_dataset_is_refused(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64))
    with pytest.raises(UserError, match="0 samples"):
        load_uploaded(path, "npz")


@pytest.mark.parametrize("higher", [True, False])
def test_a_relative_budget_on_a_zero_baseline_is_refused(higher: bool) -> None:
    with pytest.raises(UserError, match="relative budget is meaningless"):
        threshold(0.0, "relative", 0.999, higher)
    assert threshold(0.0, "absolute", 0.01, higher).value == (-0.01 if higher else 0.01)


def test_only_the_inputs_failing_is_the_users_error() -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    from workers.engine.context import JobCancelled, inputs_at_fault

    with (pytest.raises(UserError, match=r"^the model broke \(RuntimeError: shapes\); fix it$"),
          inputs_at_fault("the model broke", "; fix it")):
        raise RuntimeError("shapes\nmore detail")
    # a cancel or the time limit landing inside is what it is, not the user's data
    for exc in (JobCancelled(), SoftTimeLimitExceeded(), UserError("already clear")):
        with pytest.raises(type(exc)) as caught, inputs_at_fault("the model broke"):
            raise exc
        assert caught.value is exc


def test_nan_inputs_are_refused_infinities_are_not(tmp_path: Path) -> None:
    x = np.zeros((4, 1, 8, 8), np.float32)
    x[2, 0, 0, 0] = -np.inf  # an additive attention mask's "never": a legitimate input
    load_uploaded(_npz(tmp_path, x=x, y=np.zeros(4, np.int64)), "npz")
    x[1, 0, 2, 3] = x[3, 0, 1, 1] = np.nan
    with pytest.raises(UserError, match="'x' holds 2 NaN values"):
        load_uploaded(_npz(tmp_path, x=x, y=np.zeros(4, np.int64)), "npz")


def test_labels_that_are_all_skipped_are_refused() -> None:
    with pytest.raises(UserError, match="every label is -100"):
        _task(torch.randn(8, 1, 8, 8), torch.full((8,), -100))


def test_a_job_that_scores_every_label_refuses_the_skip_label() -> None:
    from workers.engine.datasets import check_class_labels

    with pytest.raises(UserError, match="drop the samples labelled -100"):
        check_class_labels(torch.tensor([0, -100, 1]), torch.zeros(3, 4), 3, skip_ignored=False)


def test_a_model_that_returns_a_tuple_is_refused() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.fc(x.flatten(1))
            return y, y

    model = Pair().eval()
    x = torch.randn(8, 1, 8, 8)
    with pytest.raises(UserError, match=r"must return one tensor .* not a tuple"):
        QuantTask(model, quantizable_layers(model), (x,), None, (x,), None, "cosine")


def test_advice_is_read_from_the_error() -> None:
    from workers.engine.context import input_advice

    batch = input_advice(AssertionError("Guard failed: x.size()[0] == 1"), {"x": [1, 16]})
    assert "fixed batch for inputs {'x': [1, 16]}" in batch and "torch.export.Dim" in batch
    # a feature dimension that does not fit: the data is wrong, not the batch
    width = input_advice(AssertionError("Guard failed: x.size()[1] == 16"), {"x": [1, 16]})
    assert "give inputs of those shapes" in width and "fixed batch" not in width
    conv = input_advice(RuntimeError("Input type (unsigned char) and bias type (float) should "
                                     "be the same"))
    assert "float32 arrays for a float model" in conv
    assert "int64 token ids" in input_advice(RuntimeError("mat1 and mat2 must have the same dtype"))
    assert "vocabulary" in input_advice(IndexError("index out of range in self"))
    assert input_advice(RuntimeError("something else")) == ""


class _Log(nn.Module):
    """A user's model that takes the log of its logits: NaN where they are negative."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x).log()
        return out


def test_a_model_whose_float_outputs_are_nan_is_refused() -> None:
    torch.manual_seed(0)
    model = _Log().eval()
    x = torch.randn(16, 4)
    with pytest.raises(UserError, match=r"outputs on the calibration samples hold \d+ NaN "
                                        r"values \(of 48\): no cosine can be measured"):
        QuantTask(model, quantizable_layers(model), (x,), None, (x,), None, "cosine")


def test_minus_inf_logits_pass_for_cross_entropy_but_not_for_distances() -> None:
    head = nn.Linear(4, 3)
    model = nn.Sequential(head).eval()
    with torch.no_grad():
        head.bias[2] = -float("inf")  # class 2 masked out
    x, y = torch.randn(8, 4), torch.zeros(8, dtype=torch.long)
    task = QuantTask(model, quantizable_layers(model), (x,), y, (x,), y, "accuracy")
    assert 0.0 <= task.evaluate({}) <= 1.0
    with pytest.raises(UserError, match=r"hold 8 infinite values \(of 24\): no mse"):
        QuantTask(model, quantizable_layers(model), (x,), None, (x,), None, "mse")


def test_a_relative_mse_budget_says_to_give_an_absolute_one() -> None:
    # mse is measured against the float model's own outputs: its baseline is 0 by definition,
    # not because the data is wrong, so the advice must not be to check the data.
    with pytest.raises(UserError, match="0 for the float model by definition") as caught:
        threshold(0.0, "relative", 0.999, False, metric="mse")
    assert "check the data" not in str(caught.value) and '"absolute"' in str(caught.value)
    assert threshold(0.0, "absolute", 1e-3, False, metric="mse").value == 1e-3
    assert threshold(0.9, "relative", 0.999, True, metric="cosine").value == pytest.approx(0.8991)
