"""Projections, the d_int90 search and the artifact, each against something exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.schemas import IntrinsicDimensionSpec
from workers.engine import datasets
from workers.engine.context import LocalContext, UserError
from workers.engine.intrinsic import job
from workers.engine.intrinsic.projections import Fastfood, make
from workers.engine.intrinsic.search import gallop_bisect, grid_sweep
from workers.engine.intrinsic.subspace import (
    Artifact,
    evaluate,
    flatten,
    init_params,
    rebuild,
    reinit_factory,
    reset_coverage,
    segments,
    train_subspace,
    unflatten,
)


@pytest.mark.parametrize("kind", ["dense", "sparse", "fastfood"])
def test_projections_preserve_norms_in_expectation(kind: str) -> None:
    proj = make(kind, 3000, 64, seed=5)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(300, 64, generator=gen)
    xs = xs / xs.norm(dim=1, keepdim=True)
    mean_sq = float(torch.stack([proj(x).norm() ** 2 for x in xs]).mean())
    assert mean_sq == pytest.approx(1.0, abs=0.05)
    assert proj(torch.zeros(64)).abs().max() == 0


def test_fastfood_equals_its_dense_equivalent() -> None:
    for D, d, seed in [(40, 10, 3), (100, 16, 1), (7, 5, 2)]:
        f = Fastfood(D, d, seed)
        dense = f.dense()
        assert dense.shape == (D, d)
        x = torch.randn(d, generator=torch.Generator().manual_seed(seed))
        assert torch.allclose(f(x), dense @ x, atol=1e-5)


def test_search_finds_the_grid_boundary_with_fewer_runs() -> None:
    grid = list(range(10, 2010, 10))
    for boundary in (10, 15, 330, 1990, 5000):
        def run(d: int, b: int = boundary) -> float:
            return 1.0 if d >= b else 0.0

        fast, full = gallop_bisect(run, grid, 0.5), grid_sweep(run, grid, 0.5)
        assert fast.d_int == full.d_int
        assert len(fast.runs) <= 2 * 8 + 2 < len(full.runs)


@pytest.mark.parametrize("per_seed, expected", [
    ([250, 250, 300], 250),
    ([1000, 300], 1000),  # not 650: a d that no run trained
    ([None, 250, 300], 300),  # a seed that never passed is not dropped
    ([300, None], None),
    ([None], None),
])
def test_the_reported_d_is_one_a_majority_of_seeds_reached(per_seed: list[int | None],
                                                            expected: int | None) -> None:
    assert job.majority_d(per_seed) == expected


def test_artifact_rebuilds_the_trained_model_bit_for_bit() -> None:
    tr, te = datasets.digits("train"), datasets.digits("test")
    assert tr.labels is not None and te.labels is not None
    for kind in ("fastfood", "dense", "sparse"):
        r = train_subspace(job.digits_mlp, 24, kind, (tr.inputs["x"][:256], tr.labels[:256]),  # type: ignore[arg-type]
                           (te.inputs["x"], te.labels), 1, 0.05, theta0_seed=3,
                           projection_seed=4)
        _, theta0 = init_params(job.digits_mlp, 3)
        D = flatten(theta0).numel()
        art = Artifact("digits-mlp", 3, kind, 4, D, 24, Artifact.pack(r.d_vector))  # type: ignore[arg-type]
        back = Artifact(**{**art.__dict__})
        assert torch.equal(back.values, r.d_vector)
        rebuilt = rebuild(back, job.digits_mlp)
        expected = unflatten(flatten(theta0) + make(kind, D, 24, 4)(r.d_vector), theta0)  # type: ignore[arg-type]
        for name, p in rebuilt.named_parameters():
            assert torch.equal(p, expected[name]), name
        assert art.stored_bytes() * 100 < 4 * D


def test_job_on_a_small_grid(tmp_path: Path) -> None:
    ctx = LocalContext(tmp_path)
    res = job.run(IntrinsicDimensionSpec(grid=[5, 50, 400, 2000], epochs=3, seeds=[0]), ctx)
    assert res.parameters == 55_210 and res.full_accuracy > 0.8  # 64-200-200-10
    assert res.d_int90 in (None, 5, 50, 400, 2000)
    if res.d_int90 is not None:
        passing = [c for c in res.curve if c.d == res.d_int90]
        assert passing[0].accuracy >= res.target
        assert res.rebuilt_accuracy == pytest.approx(passing[0].accuracy, abs=1e-9)
        assert (ctx.workdir / "artifacts" / "intrinsic.json").exists()


def _bn_mlp() -> torch.nn.Module:
    nn = torch.nn
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.Linear(64, 10))


def test_batchnorm_statistics_travel_with_the_artifact(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Train mode updates BatchNorm's running statistics, which eval mode (the measured accuracy)
    reads; they are not in theta and no seed redraws them. The rebuilt model used to normalize
    with the initial statistics: 0.47 accuracy against the run's 0.82 (Fastfood, d = 200)."""
    monkeypatch.setitem(job.FACTORIES, "digits-mlp", _bn_mlp)
    ctx = LocalContext(tmp_path)
    res = job.run(IntrinsicDimensionSpec(grid=[200], epochs=2, lr=0.05, threshold=0.5,
                                         fan_out=False), ctx)
    assert res.d_int90 == 200
    trained = next(c.accuracy for c in res.curve if c.d == 200)
    assert res.rebuilt_accuracy == pytest.approx(trained, abs=1e-9)
    raw = json.loads((ctx.workdir / "artifacts" / "intrinsic.json").read_bytes())
    art = Artifact(**raw)
    assert art.buffers is not None
    assert set(art.buffers) == {"2.running_mean", "2.running_var", "2.num_batches_tracked"}
    te = datasets.digits("test")
    assert te.labels is not None
    rebuilt = rebuild(art, _bn_mlp)
    assert evaluate(rebuilt, None, te.inputs["x"], te.labels) == pytest.approx(trained)
    # 64 + 64 float32 statistics and one int64 counter, counted in the stored size
    assert art.stored_bytes() == 4 * 200 + 4 * 128 + 8 + 64


def test_layer_scaling_trains_and_rebuilds_bit_for_bit() -> None:
    """Structure-aware variant: one learned scale per parameter tensor, stored in the artifact
    and applied on rebuild; the model equals theta0 + scale_i (P d)_i exactly."""
    tr, te = datasets.digits("train"), datasets.digits("test")
    assert tr.labels is not None and te.labels is not None
    r = train_subspace(job.digits_mlp, 32, "fastfood", (tr.inputs["x"][:512], tr.labels[:512]),
                       (te.inputs["x"], te.labels), 2, 0.05, theta0_seed=1, projection_seed=2,
                       layer_scaling=True)
    _, theta0 = init_params(job.digits_mlp, 1)
    assert r.layer_scales is not None and r.layer_scales.shape == (len(theta0),)
    assert not torch.equal(r.layer_scales, torch.ones(len(theta0)))  # they were trained
    D = flatten(theta0).numel()
    art = Artifact("digits-mlp", 1, "fastfood", 2, D, 32, Artifact.pack(r.d_vector),
                   Artifact.pack(r.layer_scales))
    assert art.stored_bytes() == 4 * (32 + len(theta0)) + 64
    rebuilt = rebuild(Artifact(**{**art.__dict__}), job.digits_mlp)
    offset = make("fastfood", D, 32, 2)(r.d_vector)
    scaled = offset * r.layer_scales[segments(theta0)]
    expected = unflatten(flatten(theta0) + scaled, theta0)
    for name, p in rebuilt.named_parameters():
        assert torch.equal(p, expected[name]), name
    assert evaluate(rebuilt, None, te.inputs["x"], te.labels) == pytest.approx(r.accuracy)


def test_uploaded_pt2_is_reinitialized_deterministically(tmp_path: Path) -> None:
    """An uploaded architecture's theta0: its Linear layers redrawn under the seed, the same
    for the same seed, different for another, and trainable in a subspace."""
    from tests.helpers import export_tiny
    from workers.engine import graph_layers

    ep = torch.export.load(export_tiny(tmp_path / "tiny.pt2"))
    module = graph_layers.restore_layers(ep.module())  # type: ignore[arg-type]
    factory = reinit_factory(module)
    covered, total = reset_coverage(module)
    assert covered == total > 0  # TinyMLP: only Linear layers
    _, a = init_params(factory, 7)
    _, b = init_params(factory, 7)
    _, c = init_params(factory, 8)
    uploaded = dict(module.named_parameters())
    for name in a:
        assert torch.equal(a[name], b[name])
        assert not torch.equal(a[name], c[name]) and not torch.equal(a[name], uploaded[name])
    x = torch.randn(64, 16)
    y = (x[:, 0] > 0).long()
    r = train_subspace(factory, 8, "dense", (x, y), (x, y), 2, 0.05, theta0_seed=7,
                       projection_seed=9)
    assert 0.0 <= r.accuracy <= 1.0 and r.steps == 2


def test_a_projection_larger_than_free_memory_is_refused_before_training(tmp_path: Path) -> None:
    # digits-cnn (D = 315,402) densely to d = D: 741 GiB with its gradient (digits-mlp to
    # d = 10^7, 4.4 TB, died in torch's allocator before this check)
    spec = IntrinsicDimensionSpec(model="digits-cnn", projection="dense", grid=[10, 315_402],
                                  epochs=1)
    with pytest.raises(UserError, match=r"dense projection of D = 315,402 parameters to "
                                        r"d = 315,402 needs about 741\.\d GiB.*'fastfood'"):
        job.run(spec, LocalContext(tmp_path))
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").iterdir())


def test_a_sparse_projection_too_slow_to_draw_is_refused_before_training(tmp_path: Path) -> None:
    # 55,210 x 55,210 fits in memory but would take ~2 min per draw (x 10^6 took ~40 min)
    spec = IntrinsicDimensionSpec(projection="sparse", grid=[10, 55_210], epochs=1)
    with pytest.raises(UserError, match=r"sparse projection of D = 55,210 parameters to "
                                        r"d = 55,210 draws a permutation .*'fastfood'"):
        job.run(spec, LocalContext(tmp_path))
    assert 315_402 * max(job.DEFAULT_GRID) < job.SPARSE_DRAW_LIMIT  # the default grid passes


def _uploaded_problem(tmp_path: Path, model_file: Path, x: torch.Tensor, y: torch.Tensor
                      ) -> None:
    """``job._problem`` on a model and labeled dataset stored the way the API stores uploads."""
    import numpy as np

    from app.config import Settings
    from app.schemas import DatasetRef, ModelRef
    from app.storage import open_store

    store = open_store(Settings(store_url=(tmp_path / "store").as_uri()))
    mdl, dst = "mdl_" + "0" * 32, "dst_" + "0" * 32
    store.put_file(f"tenants/local/models/{mdl}/model.pt2", model_file)
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    store.put_file(f"tenants/local/datasets/{dst}/data.npz", tmp_path / "d.npz")
    spec = IntrinsicDimensionSpec(model=ModelRef(id=mdl), dataset=DatasetRef(id=dst),
                                  grid=[2, 4], epochs=1)
    job._problem(spec, LocalContext(tmp_path / "work", store=store))


def test_an_uploaded_model_that_cannot_take_the_data_is_the_users_error(tmp_path: Path) -> None:
    fixed = torch.export.export(torch.nn.Linear(16, 4).eval(), (torch.randn(1, 16),))
    torch.export.save(fixed, str(tmp_path / "fixed.pt2"))  # exported for a batch of 1 only
    x, y = torch.randn(40, 16), torch.arange(40) % 4
    with pytest.raises(UserError, match=r"does not run on the dataset's inputs \(.*Guard.*"
                                        r"fixed batch for inputs \{'input': \[1, 16\]\}.*"
                                        r"torch\.export\.Dim"):
        _uploaded_problem(tmp_path, tmp_path / "fixed.pt2", x, y)
    from tests.helpers import export_tiny

    with pytest.raises(UserError, match=r"inputs' dtype is not the model's"):
        _uploaded_problem(tmp_path, export_tiny(tmp_path / "tiny.pt2"), x.long(), y)


def test_a_model_with_nothing_to_reinitialize_is_refused(tmp_path: Path) -> None:
    class Scale(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :4] * self.w

    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(Scale().eval(), (torch.randn(2, 16),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(ep, str(tmp_path / "scale.pt2"))
    with pytest.raises(UserError, match="no layer of this model can be re-initialized"):
        _uploaded_problem(tmp_path, tmp_path / "scale.pt2", torch.randn(40, 16),
                          torch.arange(40) % 4)


def test_grid_values_above_the_parameter_count_are_refused_before_training(
        tmp_path: Path) -> None:
    ctx = LocalContext(tmp_path)
    with pytest.raises(UserError, match=r"grid values \[60000\] exceed the model's 55,210 "):
        job.run(IntrinsicDimensionSpec(grid=[10, 55_210, 60_000], epochs=1), ctx)
    assert not [s for s, _, _ in ctx.events if s in ("baseline", "search")]  # nothing trained


def test_the_default_grid_stops_at_the_parameter_count() -> None:
    spec = IntrinsicDimensionSpec()
    assert job.grid_for(spec, 10**6) == job.DEFAULT_GRID
    assert job.grid_for(spec, 120) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    with pytest.raises(UserError, match="fewer than the default grid's smallest d"):
        job.grid_for(spec, 9)
