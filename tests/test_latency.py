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
from cswap.alignment import prefix_units
from cswap.build import analysis_for, resolve_adapter
from cswap.latency import TABLE_FILE, LatencyTable, latency_search, removed_copy, table_for
from cswap.models.cifar_resnet import cifar_resnet8
from cswap.plan import PruningPlan
from cswap.removal import count_params
from cswap.replay import steps_for
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
    return model, PruningPlan.from_ranking(model, adapter.units(model, x[:1]), ranking, adapter="resnet"), adapter


@pytest.fixture(scope="module")
def wide():
    model, plan, adapter = magnitude_plan(64)
    return model, plan, LatencyTable.measure(plan, model, 1, adapter=adapter, min_seconds=0.3), adapter


def test_the_table_predicts_the_original_and_fits_its_scale_by_least_squares(wide):
    model, _, table, _ = wide
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
    model, plan, table, adapter = wide
    n = len(plan.steps)
    predicted = [table.predicted_ms(removed_copy(plan, model, prefix_units(plan.steps, plan.layers, m, None), adapter))
                 for m in np.linspace(0, n, 9).astype(int)]
    assert all(b <= a for a, b in zip(predicted, predicted[1:])), predicted
    assert predicted[-1] < 0.5 * predicted[0]  # a wide model pruned to its last units: far faster, as predicted


def test_the_table_is_cached_and_refused_for_another_model_or_batch(tmp_path):
    model, plan, adapter = magnitude_plan(16)
    first = table_for(plan, model, 1, cache=tmp_path, adapter=adapter)
    saved = json.loads((tmp_path / TABLE_FILE).read_text())
    assert saved["key"]["batch"] == 1 and saved["total_ms"] == first.total_ms
    again = table_for(plan, model, 1, cache=tmp_path, adapter=adapter)
    assert again == first  # read back, not measured again (a new measurement never gives the same floats)
    assert first.matches(plan, model, 1) and not first.matches(plan, model, 4)
    other_model, other_plan, _ = magnitude_plan(8)
    assert not first.matches(other_plan, other_model, 1)
    assert not first.matches(plan, model, 1, round_to=8)  # an aligned replay is another table
    table_for(plan, model, 4, cache=tmp_path, adapter=adapter)
    assert json.loads((tmp_path / TABLE_FILE).read_text())["key"]["batch"] == 4  # measured anew, replaced


def test_the_search_returns_the_shortest_measured_prefix_that_reached_the_target(wide):
    model, plan, table, adapter = wide
    search = latency_search(plan, model, TARGET, table, adapter=adapter, min_seconds=0.3)
    n = len(plan.steps)
    assert 0 < search.steps < n
    assert search.measured_speedup >= TARGET
    measured = {m["steps"]: m["speedup"] for m in search.measurements}
    assert measured[search.steps] == search.measured_speedup
    assert all(s < TARGET for m, s in measured.items() if m < search.steps)  # shorter measured prefixes fell short
    assert search.predicted_steps <= search.steps and search.predicted_speedup >= TARGET - 1e-4
    assert json.loads(json.dumps(search.to_json()))["steps"] == search.steps


def test_a_latency_target_replays_part_of_the_plan_with_a_cached_table(wide, tmp_path):
    model, plan, table, adapter = wide
    table.save(tmp_path / TABLE_FILE)
    k, search = steps_for(plan, model, cswap.Target(latency_ratio=TARGET), adapter, latency_cache=tmp_path)
    n = len(plan.steps)
    assert 0 < k < n and search["steps"] == k and search["measured_speedup"] >= TARGET
    params = count_params(plan.apply(model, cswap.Target(params_ratio=plan.cumulative_params_removed()[k] /
                                                         plan.params_total, recovery="none")))
    assert count_params(plan.apply(model, params_ratio=plan.reachable_ratio(), recovery="none")) < params
    assert params < plan.params_total


def test_bad_and_unreachable_targets(wide):
    model, plan, table, adapter = wide
    with pytest.raises(ValueError, match="must exceed 1"):
        latency_search(plan, model, 1.0, table, adapter=adapter)
    with pytest.warns(UserWarning, match="beyond what this plan reaches"):
        search = latency_search(plan, model, 1000.0, table, adapter=adapter, min_seconds=0.1)
    assert search.steps == len(plan.steps) and search.measured_speedup < 1000


def test_the_api_latency_target_on_a_torchvision_model_after_another_replay(tmp_path):
    """Issue 23: a latency target through the API, after an earlier replay of the same plan,
    on a torchvision ResNet-18 (random init): no replay state lives on the plan, so the order
    of replays does not matter, and the saved model reloads with the target's widths."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    x, y = torch.randn(16, 3, 32, 32), torch.arange(4).repeat(4)
    analysis = analysis_for(model, ClassificationTask.from_tensors(x, y, 4))
    plan = PruningPlan.from_analysis(analysis, cswap.registry.create("criteria", "magnitude").rank(analysis, 0))
    earlier = plan.apply(model, params_ratio=0.3, recovery="none")
    target = cswap.Target(latency_ratio=1.3, recovery="none")
    fast = plan.apply(model, target)
    cswap.save_pruned(tmp_path / "fast", model, plan, target, pruned=fast)  # not measured again: its shapes say k
    assert count_params(fast) < count_params(model) and count_params(earlier) < count_params(model)
    again = cswap.load_pruned(tmp_path / "fast", model=torchvision.models.resnet18(num_classes=4))
    with torch.no_grad():
        torch.testing.assert_close(again(x[:2]), fast(x[:2]), rtol=0, atol=0)
    assert json.loads((tmp_path / "fast" / "pruned.json").read_text())["target"]["latency_ratio"] == 1.3


def test_the_report_times_in_the_chosen_backend_and_a_slower_model_is_a_warning(config, tmp_path):
    """Issue 28: `output.latency_backend` times the report's two models in that runtime, in
    turns, with each timing's spread and whether it can be trusted; the summary says where
    it was measured and warns when the pruned model is slower there."""
    from cswap.cli import main
    from cswap.reports import latency_notes

    out = tmp_path / "run"
    assert main(["prune", str(config), "--out", str(out), "--quiet",
                 "--set", "output.latency_backend=torch_channels_last"]) == 0
    report = json.loads((out / "report.json").read_text())
    for side in ("before", "after"):
        timing = report[side]["latency"]
        assert timing["backend"] == "torch_channels_last" and set(timing) >= {"batch1", "batch32"}
        assert timing["batch1"]["median_ms"] == report[side]["latency_ms_batch1"] > 0
        assert 0 <= timing["batch1"]["spread"] and timing["batch1"]["p10_ms"] <= timing["batch1"]["median_ms"]
    before = {"latency_ms_batch1": 1.0, "latency": {"backend": "onnxruntime", "threads": 1,
                                                    "batch1": {"spread": 0.02, "trusted": True}}}
    after = {"latency_ms_batch1": 1.5, "latency": {"backend": "onnxruntime", "threads": 1,
                                                   "batch1": {"spread": 0.3, "trusted": False}}}
    notes = latency_notes(before, after)
    assert notes[0].startswith("latency measured in onnxruntime (1 threads)")
    assert any("slower than the original in onnxruntime at batch 1 (x0.67)" in n for n in notes)
    assert any("varied too much to trust" in n and "batch1 30%" in n for n in notes)
    assert latency_notes({**before, "latency_ms_batch1": 2.0}, {**after, "latency": before["latency"]}) == notes[:1]
