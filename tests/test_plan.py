"""Plans: JSON round trip, replay to a parameter ratio, determinism."""
from __future__ import annotations

import json

import pytest
import torch

import cswap
from cswap.interfaces import PROGRESSIVE
from cswap.models.cifar_resnet import cifar_resnet8
from cswap.removal import count_params

from conftest import patterns, randomize_batchnorm, train


@pytest.fixture(scope="module")
def resnet_plan():
    x, y = patterns(24, classes=3, size=12, seed=5)
    torch.manual_seed(0)
    model = train(randomize_batchnorm(cifar_resnet8(width=6, in_channels=1, num_classes=3)).train(), x, y, steps=40)
    plan = cswap.analyze(model, (x, y), samples_per_class=24, seed=7, progress=False)
    return model, x, y, plan


def test_json_round_trip(resnet_plan, tmp_path):
    model, x, _, plan = resnet_plan
    plan.save(tmp_path / "plan.json")
    again = cswap.PruningPlan.load(tmp_path / "plan.json")
    assert again.to_json() == plan.to_json()
    assert [s.unit for s in again.steps] == [s.unit for s in plan.steps]
    with torch.no_grad():
        torch.testing.assert_close(again.apply(model, 0.4)(x), plan.apply(model, 0.4)(x))


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.7])
def test_apply_lands_within_one_unit_of_the_ratio(resnet_plan, ratio):
    model, x, _, plan = resnet_plan
    total = count_params(model)
    k = plan.prefix_for(ratio)
    pruned = plan.apply(model, params_ratio=ratio)
    removed = total - count_params(pruned)  # counted on the real, physically pruned model
    assert removed == plan.cumulative_params_removed()[k]
    assert removed >= ratio * total
    assert removed - plan.steps[k - 1].params_freed < ratio * total  # one step fewer falls short
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape


def test_no_ratio_means_noncritical_only(resnet_plan):
    model, _, _, plan = resnet_plan
    pruned = plan.apply(model)
    expected = sum(s.params_freed for s in plan.steps if s.phase == PROGRESSIVE)
    assert count_params(model) - count_params(pruned) == expected
    assert plan.num_noncritical == sum(plan.category_counts()[c] for c in ("neutral", "detrimental"))


def test_same_seed_same_plan_and_bytes(resnet_plan, tmp_path):
    model, x, y, plan = resnet_plan
    again = cswap.analyze(model, (x, y), samples_per_class=24, seed=7, progress=False)
    plan.save(tmp_path / "a.json")
    again.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_apply_refuses_another_model(resnet_plan):
    _, _, _, plan = resnet_plan
    with pytest.raises(cswap.errors.ModelError, match="parameters"):
        plan.apply(cifar_resnet8(width=8, in_channels=1, num_classes=3), 0.2)


def test_flops_ratio(resnet_plan):
    from cswap.metrics import count_macs

    model, x, _, plan = resnet_plan
    base = count_macs(model, x[:1])
    pruned = plan.apply(model, flops_ratio=0.3)
    assert count_macs(pruned, x[:1]) <= 0.7 * base


def test_schema_is_checked(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="schema"):
        cswap.PruningPlan.load(tmp_path / "p.json")


def test_costs_time_the_models_in_turns_and_rank_them():
    from torch import nn

    from cswap.metrics import compare_costs

    small = nn.Sequential(nn.Linear(64, 8)).eval()
    big = nn.Sequential(*[nn.Linear(64, 64) for _ in range(50)], nn.Linear(64, 8)).train()
    big_costs, small_costs = compare_costs([big, small], torch.randn(4, 64), batch=8, repeats=5)
    assert big.training and not small.training  # each model's mode is given back
    assert big_costs["macs"] > 40 * small_costs["macs"]
    assert big_costs["latency_ms_batch1"] > small_costs["latency_ms_batch1"]
    assert big_costs["latency_ms_batch8"] > small_costs["latency_ms_batch8"]
