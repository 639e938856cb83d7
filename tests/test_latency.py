"""`pruning.latency_ratio` (cswap/latency.py): the latency table, its cache, its prediction and the
measured search, on a CIFAR ResNet-8 wide enough (width 64, 3x16x16) that compute, not per-layer
overhead, dominates its latency: the whole plan is several times faster, so a 1.2x target lies
far from both ends. Wall-clock numbers are noisy on a shared machine; the tests check what the
code guarantees about them (the bookkeeping), not their values."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cswap
from cswap.build import analysis_for, resolve_adapter
from cswap.latency import TABLE_FILE, LatencyTable, latency_search, removed_copy, table_for
from cswap.models.cifar_resnet import cifar_resnet8
from cswap.plan import PruningPlan
from cswap.removal import count_params
from cswap.tasks.classification import ClassificationTask

TARGET = 1.2


def magnitude_plan(width: int):
    """A random-weight ResNet-8 and its magnitude ranking (every unit ranked; seconds to build)."""
    torch.manual_seed(0)
    model = cifar_resnet8(width=width, in_channels=3, num_classes=3).eval()
    x, y = torch.randn(30, 3, 16, 16), torch.arange(3).repeat(10)
    ranking = cswap.registry.create("criteria", "magnitude").rank(
        analysis_for(model, ClassificationTask.from_tensors(x, y, 10)), 0)
    _, adapter = resolve_adapter("auto", model)
    return model, PruningPlan.from_ranking(model, adapter.units(model, x[:1]), ranking, adapter="resnet")


@pytest.fixture(scope="module")
def wide():
    model, plan = magnitude_plan(64)
    return model, plan, LatencyTable.measure(plan, model, 1, min_seconds=0.3)


def test_the_table_predicts_the_original_and_fits_its_scale_by_least_squares(wide):
    model, _, table = wide
    assert table.predicted_ms(model) == table.total_ms  # nothing removed: nothing saved
    for m in table.modules.values():
        assert m["b"] >= 0 and m["samples"][0][0] == 1.0 and len(m["samples"]) == 4
    # scale minimises sum (real - scale * raw)^2 over the uniform copies: the residual is orthogonal to raw
    raw = np.array([(table.total_ms - v["predicted_ms"]) / table.scale for v in table.variants])
    real = np.array([table.total_ms - v["measured_ms"] for v in table.variants])
    assert 0 < table.scale < 10
    assert abs(np.dot(raw, real - table.scale * raw)) <= 1e-3 * np.dot(raw, raw) * table.scale + 1e-6


def test_predictions_never_rise_as_the_prefix_grows(wide):
    """b >= 0 and scale >= 0, and a longer prefix only shrinks weights: guaranteed non-increasing."""
    model, plan, table = wide
    n = len(plan.steps)
    predicted = [table.predicted_ms(removed_copy(plan, model, plan.units(m))) for m in np.linspace(0, n, 9).astype(int)]
    assert all(b <= a for a, b in zip(predicted, predicted[1:])), predicted
    assert predicted[-1] < 0.5 * predicted[0]  # a wide model pruned to its last units: far faster, as predicted


def test_the_table_is_cached_and_refused_for_another_model_or_batch(tmp_path):
    model, plan = magnitude_plan(16)
    first = table_for(plan, model, 1, cache=tmp_path)
    saved = json.loads((tmp_path / TABLE_FILE).read_text())
    assert saved["key"]["batch"] == 1 and saved["total_ms"] == first.total_ms
    again = table_for(plan, model, 1, cache=tmp_path)
    assert again == first  # read back, not measured again (a new measurement never gives the same floats)
    assert first.matches(plan, model, 1) and not first.matches(plan, model, 4)
    other_model, other_plan = magnitude_plan(8)
    assert not first.matches(other_plan, other_model, 1)
    assert not first.matches(plan.aligned(8), model, 1)  # an aligned replay is another table
    table_for(plan, model, 4, cache=tmp_path)
    assert json.loads((tmp_path / TABLE_FILE).read_text())["key"]["batch"] == 4  # measured anew, replaced


def test_the_search_returns_the_shortest_measured_prefix_that_reached_the_target(wide):
    model, plan, table = wide
    search = latency_search(plan, model, TARGET, table, min_seconds=0.3)
    n = len(plan.steps)
    assert 0 < search.steps < n
    assert search.measured_speedup >= TARGET
    measured = {m["steps"]: m["speedup"] for m in search.measurements}
    assert measured[search.steps] == search.measured_speedup
    assert all(s < TARGET for m, s in measured.items() if m < search.steps)  # shorter measured prefixes fell short
    assert search.predicted_steps <= search.steps and search.predicted_speedup >= TARGET - 1e-4
    assert json.loads(json.dumps(search.to_json()))["steps"] == search.steps


def test_plan_prefix_with_a_latency_target_replays_part_of_the_plan(wide):
    model, plan, table = wide
    k = plan.prefix(model, latency_ratio=TARGET, latency=table)
    n = len(plan.steps)
    assert 0 < k < n
    params = count_params(plan.apply_prefix(model, k))
    assert count_params(plan.apply_prefix(model, n)) < params < plan.params_total


def test_bad_and_unreachable_targets(wide):
    model, plan, table = wide
    with pytest.raises(ValueError, match="must exceed 1"):
        latency_search(plan, model, 1.0, table)
    with pytest.warns(UserWarning, match="beyond what this plan reaches"):
        search = latency_search(plan, model, 1000.0, table, min_seconds=0.1)
    assert search.steps == len(plan.steps) and search.measured_speedup < 1000
