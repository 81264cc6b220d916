"""The benchmark engine called directly, as library code, with a local job context."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import Settings
from app.schemas import BenchmarkResult, BenchmarkSpec, ModelRef
from app.storage import open_store
from workers.engine import benchmark, timing, zoo
from workers.engine.context import JobCancelled, LocalContext, UserError


def ctx_for(tmp_path: Path, store_root: Path, **kw: object) -> LocalContext:
    store = open_store(Settings(store_url=store_root.as_uri()))
    return LocalContext(tmp_path / "work", store=store, **kw)  # type: ignore[arg-type]


def test_digits_cnn_benchmark(tmp_path: Path, shared_store: Path) -> None:
    ctx = ctx_for(tmp_path, shared_store)
    res = benchmark.run(BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), batch_size=8, repeats=20,
                                      warmup=2), ctx)
    assert isinstance(res, BenchmarkResult)
    assert res.input_shapes == [[8, 1, 8, 8]]
    assert res.parameters == sum(p.numel() for p in zoo.DigitsCNN().parameters())
    assert res.latency.repeats >= 20 and res.latency.min_ms <= res.latency.median_ms
    shares = sum(layer.share for layer in res.per_layer)
    assert shares == pytest.approx(1.0, abs=1e-3)  # each share is rounded to 4 decimals
    assert [s for s, _, _ in ctx.events][-1] == "done"
    saved = BenchmarkResult.model_validate_json((ctx.workdir / "artifacts" / "benchmark.json")
                                                .read_bytes())
    assert saved == res
    assert res.batch_size == 8
    assert res.throughput_per_s == pytest.approx(8 / (res.latency.median_ms / 1e3))
    # a random input's first dimension is the batch the figures are for
    shaped = benchmark.run(BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), input_shape=[16, 1, 8, 8],
                                         repeats=3, warmup=0, per_layer=False), ctx)
    assert shaped.batch_size == 16 and shaped.input_shapes == [[16, 1, 8, 8]]
    assert shaped.throughput_per_s == pytest.approx(16 / (shaped.latency.median_ms / 1e3))


def test_zoo_model_is_accurate(shared_store: Path) -> None:
    _, meta = zoo.digits_cnn(open_store(Settings(store_url=shared_store.as_uri())))
    assert meta["test_accuracy"] >= 0.95


def test_cancel_between_runs(tmp_path: Path, shared_store: Path) -> None:
    ctx = ctx_for(tmp_path, shared_store, cancel_after=5)
    with pytest.raises(JobCancelled):
        benchmark.run(BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), repeats=10_000), ctx)


def test_input_shape_for_multi_input_model_is_a_user_error(tmp_path: Path) -> None:
    ctx = LocalContext(tmp_path)
    with pytest.raises(UserError, match="dataset instead"):
        benchmark.run(BenchmarkSpec(model=ModelRef(zoo="minilm-l6"), input_shape=[1, 8]), ctx)


@pytest.mark.slow
def test_minilm_benchmark_runs_offline(tmp_path: Path) -> None:
    ctx = LocalContext(tmp_path)
    res = benchmark.run(BenchmarkSpec(model=ModelRef(zoo="minilm-l6"), batch_size=2, repeats=3,
                                      warmup=1, per_layer=False), ctx)
    assert res.input_shapes[0][0] == 2 and res.parameters > 20_000_000


def test_a_specs_thread_count_ends_with_its_job(tmp_path: Path, shared_store: Path) -> None:
    """A worker process runs job after job: one job's ``threads`` must not become the next's."""
    import torch

    from workers.engine import registry

    before = torch.get_num_threads()
    spec = BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), batch_size=8, repeats=3, warmup=1,
                         threads=before + 1, per_layer=False)
    res = registry.run(spec, ctx_for(tmp_path, shared_store))
    assert isinstance(res, BenchmarkResult) and res.environment.threads == before + 1
    assert torch.get_num_threads() == before


def test_p90_is_a_measured_time() -> None:
    assert timing.p90([float(i) for i in range(10, 0, -1)]) == 9.0  # nearest rank, not the max
    assert timing.p90([1.0, 2.0, 3.0, 4.0, 5.0]) == 5.0  # never past the slowest run
    assert timing.p90([3.0]) == 3.0


def test_threads_above_the_cores_are_applied_with_a_warning(
        tmp_path: Path, shared_store: Path, caplog: pytest.LogCaptureFixture) -> None:

    from workers.engine import registry

    cores = registry.usable_cores()
    spec = BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), repeats=3, warmup=0, per_layer=False,
                         threads=cores + 1)
    with caplog.at_level("WARNING"):
        res = registry.run(spec, ctx_for(tmp_path, shared_store))
    assert isinstance(res, BenchmarkResult) and res.environment.threads == cores + 1
    assert f"threads {cores + 1} is more than this worker's {cores} cores" in caplog.text


def test_per_layer_table_of_an_uploaded_export(tmp_path: Path) -> None:
    """An exported program calls its layers as functions; the table lists the Linear and Conv
    layers it restores (activations stay functions of the graph: not rows)."""
    from tests.workers.engine.quant.test_conv1d_upload import exported

    store = open_store(Settings(store_url=(tmp_path / "store").as_uri()))
    store.put_file(f"tenants/local/models/mdl_{'c' * 32}/model.pt2", exported(tmp_path / "m.pt2"))
    res = benchmark.run(BenchmarkSpec.model_validate({
        "model": {"id": "mdl_" + "c" * 32}, "input_shape": [8, 4, 64], "repeats": 3}),
        LocalContext(tmp_path / "work", store=store))
    assert sorted((layer.name, layer.type) for layer in res.per_layer) == [
        ("c1", "Conv1d"), ("c2", "Conv1d"), ("head", "Linear")]
    assert sum(layer.share for layer in res.per_layer) == pytest.approx(1.0, abs=1e-3)
    assert all(layer.median_ms > 0 for layer in res.per_layer)
