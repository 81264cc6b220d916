"""The rule that picks the shipped point among the measured ones, and the reason it gives."""

from __future__ import annotations

from app.schemas import ConfigPoint
from workers.engine.mixed_precision import _mark_pareto, choose_point

FP32 = "{}"  # the key the job gives fp32 (config_key({}))


def point(label: str, config: dict[str, str], metric: float, ms: float, size: int,
          inside: bool = True) -> ConfigPoint:
    return ConfigPoint(label=label, config=config, deployed_metric=metric, latency_ms=ms,
                       size_bytes=size, within_budget=inside)


def measured(*quantized: ConfigPoint, base_metric: float = 0.975) -> dict[str, ConfigPoint]:
    points = {FP32: point("fp32", {}, base_metric, 1.0, 1_270_000)}
    points |= {p.label: p for p in quantized}
    return points


def test_fastest_inside_the_budget_wins() -> None:
    points = measured(point("int8", {"fc1": "int8"}, 0.974, 0.6, 400_000),
                      point("int4", {"fc1": "int4"}, 0.970, 0.4, 200_000, inside=False))
    key, why = choose_point(points, FP32, True, 0.974, "accuracy")
    assert points[key].label == "int8"
    assert why.startswith("fastest of the 3 measured configurations") and "0.600 ms" in why


def test_within_the_tie_the_better_metric_then_the_smaller_model_wins() -> None:
    points = measured(point("a", {"fc1": "int8"}, 0.974, 0.50, 400_000),
                      point("b", {"fc2": "int8"}, 0.975, 0.51, 500_000),
                      point("c", {"fc1": "int8", "fc2": "int8"}, 0.975, 0.505, 300_000))
    key, _ = choose_point(points, FP32, True, 0.974, "accuracy")
    assert points[key].label == "c"
    # Lower-is-better metrics flip the comparison.
    points = measured(point("a", {"fc1": "int8"}, 2.10, 0.50, 400_000),
                      point("b", {"fc2": "int8"}, 2.05, 0.51, 500_000), base_metric=2.0)
    key, _ = choose_point(points, FP32, False, 2.2, "perplexity")
    assert points[key].label == "b"


def test_a_quantized_point_slower_than_fp32_never_ships() -> None:
    # Inside the tie band of fp32 and more accurate, but slower: fp32 comes back.
    points = measured(point("int4", {"fc1": "int4"}, 0.9806, 1.025, 270_000))
    key, why = choose_point(points, FP32, True, 0.974, "accuracy")
    assert key == FP32
    assert "each measured slower than fp32 (1.000 ms)" in why


def test_fp32_kept_over_a_tied_faster_point_says_why() -> None:
    points = measured(point("int8", {"fc1": "int8"}, 0.9745, 0.98, 400_000))
    key, why = choose_point(points, FP32, True, 0.974, "accuracy")
    assert key == FP32
    assert "slower" not in why
    assert "gained at most 2.0%, within the 3% counted as equal" in why
    assert "fp32 has the better accuracy (0.975000)" in why


def test_nothing_inside_or_nothing_offered() -> None:
    points = measured(point("int8", {"fc1": "int8"}, 0.90, 0.5, 400_000, inside=False))
    key, why = choose_point(points, FP32, True, 0.974, "accuracy")
    assert key == FP32 and why.startswith("none of the 1 quantized configurations")
    key, why = choose_point(measured(), FP32, True, 0.974, "accuracy")
    assert key == FP32 and why.startswith("no quantized configuration was offered")


def test_a_nan_metric_is_never_on_the_frontier() -> None:
    # An fp16 overflow makes the deployed metric NaN: compared with nothing, it would be
    # dominated by nothing and marked Pareto-optimal as the fastest point.
    pts = [point("fp32", {}, 0.99, 1.0, 1_270_000),
           point("fp16", {"fc1": "fp16"}, float("nan"), 0.3, 600_000, inside=False),
           point("int8", {"fc1": "int8"}, 0.98, 0.5, 400_000),
           point("int4", {"fc1": "int4"}, 0.97, 0.6, 200_000)]
    _mark_pareto(pts, True)
    assert [p.pareto for p in pts] == [True, False, True, False]
