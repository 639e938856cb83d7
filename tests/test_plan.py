"""Plans: JSON round trip, replay to a parameter ratio, determinism; analysis and replay kept apart."""
from __future__ import annotations

import json

import pytest
import torch

import cswap
from cswap.errors import ConfigError
from cswap.interfaces import PROGRESSIVE
from cswap.models.cifar_resnet import cifar_resnet8
from cswap.removal import count_params
from cswap.replay import adapter_of, steps_for, target_of
from cswap.tasks.classification import ClassificationTask

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
        torch.testing.assert_close(again.apply(model, params_ratio=0.4, recovery="none")(x),
                                   plan.apply(model, params_ratio=0.4, recovery="none")(x))


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.7])
def test_apply_lands_within_one_unit_of_the_ratio(resnet_plan, ratio):
    model, x, _, plan = resnet_plan
    total = count_params(model)
    k, _ = steps_for(plan, model, cswap.Target(params_ratio=ratio), adapter_of(plan))
    pruned = plan.apply(model, params_ratio=ratio, recovery="none")
    removed = total - count_params(pruned)  # counted on the real, physically pruned model
    assert removed == plan.cumulative_params_removed()[k]
    assert removed >= ratio * total
    assert removed - plan.steps[k - 1].params_freed < ratio * total  # one step fewer falls short
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape


def test_no_ratio_means_noncritical_only(resnet_plan):
    model, _, _, plan = resnet_plan
    pruned = plan.apply(model, recovery="none")
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
        plan.apply(cifar_resnet8(width=8, in_channels=1, num_classes=3), params_ratio=0.2, recovery="none")


def test_flops_ratio(resnet_plan):
    from cswap.metrics import count_macs

    model, x, _, plan = resnet_plan
    base = count_macs(model, x[:1])
    pruned = plan.apply(model, flops_ratio=0.3, recovery="none")
    assert count_macs(pruned, x[:1]) <= 0.7 * base


def test_schema_is_checked(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(cswap.errors.DataError, match="schema"):
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


def test_the_plan_records_how_its_sample_set_was_drawn_and_cut(resnet_plan):
    _, _, _, plan = resnet_plan
    assert (plan.seed, plan.samples_per_class, plan.intervention) == (7, 24, "zero")
    assert plan.test["name"] == "paired_t" and plan.scorer["name"] == "class_probability"
    assert "seed" not in plan.meta  # typed, not in the free-form metadata


@pytest.mark.parametrize("keyword", [{"params_ratio": 0.5}, {"round_to": 8}, {"recovery": "bn"},
                                     {"flops_ratio": 0.3, "engine": "staged"}])
def test_analyze_refuses_a_replay_setting_naming_where_it_belongs(resnet_plan, keyword):
    model, x, y, _ = resnet_plan
    with pytest.raises(ConfigError, match=r"replay setting.*plan\.apply"):
        cswap.analyze(model, (x, y), samples_per_class=6, progress=False, **keyword)


def test_analyze_refuses_an_unknown_option_in_one_line(resnet_plan):
    model, x, y, _ = resnet_plan
    with pytest.raises(ConfigError, match="enigne"):
        cswap.analyze(model, (x, y), samples_per_class=6, progress=False, enigne="staged")


def test_apply_repairs_by_default_on_the_analysis_data_as_the_cli_does(resnet_plan):
    """The default target recovers (least squares), so a replay without data is refused in one
    line; with the analysis's data it is the least-squares replay, and S is drawn again with
    the plan's seed and M_k."""
    model, x, y, plan = resnet_plan
    with pytest.raises(ConfigError, match="calibration data"):
        plan.apply(model, params_ratio=0.4)
    task = ClassificationTask.from_tensors(x, y, 24)
    by_task = plan.apply(model, params_ratio=0.4, data=task)
    by_tensors = plan.apply(model, cswap.Target(params_ratio=0.4, recovery="least_squares"), data=(x, y))
    by_sample_set = plan.apply(model, params_ratio=0.4, data=task.manifold(7))
    plain = plan.apply(model, params_ratio=0.4, recovery="none")
    with torch.no_grad():
        out = [m(x) for m in (by_task, by_tensors, by_sample_set, plain)]
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    torch.testing.assert_close(out[0], out[2], rtol=0, atol=0)
    assert not torch.equal(out[0], out[3])  # the repair changed the weights, not the shapes
    assert count_params(by_task) == count_params(plain)


def test_a_target_refuses_an_analysis_option():
    with pytest.raises(ConfigError, match="analysis options"):
        target_of(engine="staged")
