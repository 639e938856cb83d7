"""`pruning.round_to`: an aligned replay keeps every pruned width a multiple of k, exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cswap
from cswap.alignment import aligned_count, aligned_units, prefix_units
from cswap.bisection import smallest_prefix
from cswap.build import analysis_for, resolve_adapter
from cswap.errors import ConfigError
from cswap.interfaces import PROGRESSIVE, PlanStep, Unit
from cswap.metrics import count_macs
from cswap.models.cifar_resnet import cifar_resnet8
from cswap.plan import PruningPlan
from cswap.removal import count_params
from cswap.replay import ReplayData, adapter_of, replay_steps, steps_for
from cswap.tasks.classification import ClassificationTask

from conftest import patterns, train


def test_aligned_count_is_the_nearest_aligned_width():
    assert aligned_count(16, 3, 15, 8) == 0  # hold back: 16 stays
    assert aligned_count(16, 5, 15, 8) == 8  # bring forward: 16 -> 8
    assert aligned_count(16, 4, 15, 8) == 0  # a tie holds back
    assert aligned_count(16, 15, 15, 8) == 8  # never below k
    assert aligned_count(10, 2, 9, 8) == 2  # 10 -> 8: the first aligned width
    assert aligned_count(10, 1, 9, 8) == 0  # a tie between 10 and 8 holds back
    assert aligned_count(6, 5, 5, 8) == 0  # narrower than k: never pruned
    assert aligned_count(24, 9, 9, 8) == 8  # only 9 units in the plan: 16 is the narrowest reachable


def test_aligned_units_come_in_plan_order_and_grow_with_the_prefix():
    steps = [PlanStep(Unit("a" if i % 3 else "b", i), PROGRESSIVE) for i in range(60)]
    layers = {"a": 48, "b": 24}
    previous: set = set()
    for m in range(len(steps) + 1):
        units = aligned_units(steps, layers, m, 8)
        assert units == sorted(units, key=lambda u: u.channel)  # plan order
        for name, width in layers.items():
            assert (width - sum(u.layer == name for u in units)) % 8 == 0
        assert previous <= set(units)  # nested: a larger prefix never removes fewer
        previous = set(units)


def test_smallest_prefix_bisects_a_monotone_predicate():
    assert smallest_prefix(lambda m: m >= 37, 0, 100) == 37
    assert smallest_prefix(lambda m: True, 0, 100) == 0
    assert smallest_prefix(lambda m: False, 0, 100) is None
    assert smallest_prefix(lambda m: m >= 37, 40, 100) == 40
    calls = []
    found = smallest_prefix(lambda m: calls.append(m) or m >= 37, 0, 100, max_checks=2)
    assert len(calls) == 3 and found >= 37  # the budget stops the search at a prefix known to reach


@pytest.fixture(scope="module")
def resnet_plan():
    x, y = patterns(16, classes=3, size=12, seed=4)
    torch.manual_seed(0)
    model = train(cifar_resnet8(width=16, in_channels=1, num_classes=3).train(), x, y, steps=30)
    ranking = cswap.registry.create("criteria", "random").rank(
        analysis_for(model, ClassificationTask.from_tensors(x, y, 16)), 0)
    _, adapter = resolve_adapter("auto", model)
    graph = adapter.units(model, x[:1])
    return model, x, PruningPlan.from_ranking(model, graph, ranking, adapter="resnet")


def _pruned_widths(plan: PruningPlan, model, pruned) -> dict[str, tuple[int, int]]:
    """Per plan layer: (original width, width after the replay), read from the pruned module."""
    out = {}
    for name, channels in plan.layers.items():
        module = pruned.get_submodule(name)
        out[name] = (int(channels), module.weight.shape[0])
    return out


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6])
def test_round_to_8_keeps_every_pruned_width_a_multiple_of_8(resnet_plan, ratio):
    model, x, plan = resnet_plan
    aligned = cswap.Target(params_ratio=ratio, round_to=8, recovery="none")
    pruned = plan.apply(model, aligned)
    widths = _pruned_widths(plan, model, pruned)
    changed = {n: w for n, (c, w) in widths.items() if w != c}
    assert changed, "nothing was pruned: the test would prove nothing"
    assert all(w % 8 == 0 and w >= 8 for w in changed.values()), changed
    removed = 1 - count_params(pruned) / plan.params_total
    assert removed >= ratio - 1e-9
    # the fewest steps: one step less and the aligned replay falls short of the target
    k, _ = steps_for(plan, model, aligned, adapter_of(plan))
    shorter = replay_steps(plan, model, k - 1, aligned, ReplayData(), adapter=adapter_of(plan)).model
    assert k > 0 and 1 - count_params(shorter) / plan.params_total < ratio
    # plain replay of the same plan does leave unaligned widths (so alignment did something)
    plain = _pruned_widths(plan, model, plan.apply(model, params_ratio=ratio, recovery="none"))
    assert any(w % 8 for c, w in plain.values() if w != c)
    with torch.no_grad():
        assert pruned(x[:4]).shape == model(x[:4]).shape


def test_round_to_is_a_replay_setting_the_plan_does_not_hold(resnet_plan):
    model, _, plan = resnet_plan
    assert "round_to" not in plan.to_json() and not hasattr(plan, "round_to")
    assert prefix_units(plan.steps, plan.layers, 10, None) == [s.unit for s in plan.steps[:10]]
    assert prefix_units(plan.steps, plan.layers, 10, 8) == aligned_units(plan.steps, plan.layers, 10, 8)


def test_round_to_with_a_flops_target(resnet_plan):
    model, x, plan = resnet_plan
    pruned = plan.apply(model, flops_ratio=0.3, round_to=8, recovery="none")
    widths = _pruned_widths(plan, model, pruned)
    assert all(w % 8 == 0 for c, w in widths.values() if w != c)
    assert 1 - count_macs(pruned, x[:1]) / count_macs(model, x[:1]) >= 0.3


def test_round_to_option_is_validated():
    assert cswap.Target(round_to=8).round_to == 8 and cswap.PruningOptions(round_to=8).target.round_to == 8
    with pytest.raises(ValueError):
        cswap.Target(round_to=0)
    assert np.isclose(cswap.PruningOptions(latency_ratio=1.5).latency_ratio, 1.5)
    with pytest.raises(ValueError, match="one target"):
        cswap.PruningOptions(latency_ratio=1.5, params_ratio=0.3)
    with pytest.raises(ConfigError, match="one target"):
        cswap.replay.target_of(latency_ratio=1.5, params_ratio=0.3)


def test_cswap_prune_with_round_to_saves_and_reloads_aligned_widths(config, tmp_path):
    """`cswap prune` replays aligned (`pruning.round_to`), also a compensated plan, records it,
    and `load_pruned` rebuilds the same widths: every pruned layer a multiple of 4."""
    import json

    from torch import nn

    from cswap.cli import main

    out = tmp_path / "aligned"
    assert main(["prune", str(config), "--out", str(out), "--quiet", "--set", "pruning.round_to=4",
                 "--set", "pruning.intervention=mean",  # a compensated plan: the aligned target counts shapes only
                 "--set", "model.kwargs={width: 8, in_channels: 1, num_classes: 3}", "--set", "model.weights=null",
                 "--set", "pruning.params_ratio=0.4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["target"]["round_to"] == 4 and report["params_removed_ratio"] >= 0.4
    assert json.loads((out / "pruned.json").read_text())["target"]["round_to"] == 4
    model = cswap.load_pruned(out)
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    original = [m.out_channels for m in cifar_resnet8(width=8, in_channels=1, num_classes=3).modules()
                if isinstance(m, nn.Conv2d)]
    assert widths != original and all(w % 4 == 0 for w in widths)
