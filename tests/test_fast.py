"""Opt-in fast modes (cswap/fast.py): what each saves and what it must still get right."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cswap import registry
from cswap.build import resolve_adapter
from cswap.errors import ConfigError
from cswap.interfaces import Manifold
from cswap.models.cifar_resnet import cifar_resnet8
from cswap.options import FastOptions
from cswap.pruner.fast import GroupSizer, stratified, taylor_estimates
from cswap.tasks.classification import ClassificationTask

from conftest import blobs, cswap_plan, patterns, train


def _analysis(model, x, y, fast=None, samples_per_class=30, batch_size=256, engine="auto", seed=0):
    task = ClassificationTask.from_tensors(x, y, samples_per_class, batch_size=batch_size)
    plan = cswap_plan(model, task, seed, engine=engine, fast=FastOptions(**(fast or {})))
    return plan, resolve_adapter("auto", model)[1].units(model, x[:1])


@pytest.fixture(scope="module")
def sparse_mlp():
    """A trained 8-64-3 MLP of which 48 hidden units are dead (no outgoing weight): a model
    with many exactly neutral units, where group testing should save most trials."""
    x, y = blobs(40, dim=8)
    torch.manual_seed(3)
    model = train(nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3)), x, y, steps=150)
    dead = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:48]
    with torch.no_grad():
        model[2].weight[:, dead] = 0.0
    return model, x, y, {f"0:{int(c)}" for c in dead}


def test_group_testing_removes_neutral_blocks_with_fewer_trials(sparse_mlp):
    model, x, y, dead = sparse_mlp
    exact, graph = _analysis(model, x, y)
    exact_cat = {str(s.unit): s.category for s in exact.steps}
    assert all(exact_cat[u] == "neutral" for u in dead)  # dead units are neutral for the exact test
    tested = exact.meta["units_tested"]
    for fast, most in (({"group_testing": True}, tested - 1), ({"group_testing": True, "taylor_order": True}, tested / 2)):
        grouped, _ = _analysis(model, x, y, fast)
        group_cat = {str(s.unit): s.category for s in grouped.steps}
        assert all(group_cat[u] == "neutral" for u in dead)  # every dead unit is removed
        assert grouped.meta["fast"]["trials"] <= most, (fast, grouped.meta["fast"]["trials"], tested)
        # the units kept as critical are the exact ones (a visiting order other than the exact
        # one may change a borderline verdict: progressive decisions depend on the order)
        critical = {u for u, c in exact_cat.items() if c == "critical"}
        assert len(critical - {u for u, c in group_cat.items() if c == "critical"}) <= 1
        # the plan replays physically
        pruned = grouped.apply(model, params_ratio=grouped.reachable_ratio() * 0.5, recovery="none")
        assert pruned[0].out_features < 64


def test_group_sizer_follows_the_neutral_rate():
    s = GroupSizer(initial=8, maximum=32)
    assert s.size() == 8  # the prior is the rate for which 8 is Dorfman's optimum
    for _ in range(20):
        s.record(1, 1)  # a dense layer: every unit non-neutral
    assert s.size() == 1
    s.new_layer()
    assert s.size() == 1  # a new layer starts from the rate seen over all layers
    t = GroupSizer(initial=4, maximum=32)
    t.record(400, 0)  # nothing non-neutral so far: large blocks, capped
    assert t.size() == 32
    for _ in range(5):
        t.record(1, 1)  # a dense stretch after many neutral units: pooling stops within a few units
    assert t.size() == 1


def test_sequential_stops_clear_critical_units_early(trained_cnn):
    model, x, y = trained_cnn
    exact, _ = _analysis(model, x, y, samples_per_class=40)
    seq, _ = _analysis(model, x, y, {"sequential": True, "looks": 4, "interim_alpha": 0.01}, samples_per_class=40)
    fast = seq.meta["fast"]
    assert fast["trials"] == exact.meta["units_tested"]  # one trial per unit, but shorter ones
    assert fast["trial_sample_passes"] < fast["trials"]
    agree = np.mean([a.category == b.category for a, b in zip(
        sorted(exact.steps, key=lambda s: s.unit), sorted(seq.steps, key=lambda s: s.unit))])
    assert agree >= 0.9, agree


def test_stratified_parts_hold_every_class_in_proportion():
    x, y = patterns(12)
    m = Manifold([(x[i:i + 16], y[i:i + 16]) for i in range(0, 36, 16)], {0: 12, 1: 12, 2: 12})
    strat, marks = stratified(m, looks=4)
    assert marks == [1, 2, 3]
    labels = [yb for _, yb in strat]
    assert [len(t) for t in labels] == [9, 9, 9, 9]
    assert all(torch.bincount(t, minlength=3).tolist() == [3, 3, 3] for t in labels)
    # the same samples: every (input, label) pair is still there
    per_sample = torch.cat([xb for xb, _ in strat]).flatten(1).sum(1)
    assert torch.equal(per_sample.sort().values, x.flatten(1).sum(1).sort().values)


def test_taylor_estimate_is_the_derivative_of_the_cut():
    """The estimate for unit c is the derivative of mean log sigma along the cut's direction
    (scaling the weights that read c from 1 to 0), checked by central differences in float64."""
    x, y = patterns(10)
    torch.manual_seed(0)
    model = cifar_resnet8(width=4, in_channels=1, num_classes=3).double().eval()
    x = x.double()
    _, adapter = resolve_adapter("auto", model)
    graph = adapter.units(model, x[:1])
    layer = graph.layers[1]
    scorer = registry.create("scorers", "class_probability")
    manifold = Manifold([(x, y)], {0: 10, 1: 10, 2: 10})
    est = taylor_estimates(model, graph, layer.name, manifold, scorer, "relative", "cpu")
    params = dict(model.named_parameters())

    def objective(unit: int, scale: float) -> float:
        saved = []
        with torch.no_grad():
            for p, dim, per_channel in layer.reads:
                idx = torch.tensor(per_channel[unit])
                saved.append((p, dim, idx, params[p].index_select(dim, idx).clone()))
                params[p].index_copy_(dim, idx, params[p].index_select(dim, idx) * scale)
            value = torch.log(scorer.differentiable(model(x), y)).mean().item()
            for p, dim, idx, w in saved:
                params[p].index_copy_(dim, idx, w)
        return value

    for c in range(min(3, layer.channels)):
        h = 1e-5
        derivative = (objective(c, 1 + h) - objective(c, 1 - h)) / (2 * h)  # d/d(scale) at 1
        # cutting moves scale from 1 to 0: first-order change = -derivative
        assert est[graph.layers[1].units()[c]] == pytest.approx(-derivative, rel=1e-5, abs=1e-9)


def test_taylor_order_runs_and_needs_a_differentiable_scorer(trained_cnn):
    model, x, y = trained_cnn
    plan, _ = _analysis(model, x, y, {"taylor_order": True, "group_testing": True}, samples_per_class=20)
    assert plan.meta["fast"]["taylor_order"] is True
    assert sum(plan.meta["categories"].values()) == sum(len(layer.units()) for layer in _analysis(
        model, x, y, samples_per_class=20)[1].layers)


def test_sequential_needs_several_parts():
    x, y = patterns(1, classes=1)
    with pytest.raises(ConfigError, match="at least two batches"):
        stratified(Manifold([(x, y)], {0: 1}), looks=4)


def test_prune_cli_with_fast_modes(config, tmp_path):
    from cswap.cli import main

    out = tmp_path / "fast_run"
    code = main(["prune", str(config), "--out", str(out), "--quiet",
                 "--set", "pruning.fast.group_testing=true", "--set", "pruning.fast.sequential=true",
                 "--set", "task.options.batch_size=9"])
    assert code == 0
    import json

    plan = json.loads((out / "plan.json").read_text())
    assert plan["meta"]["fast"]["group_testing"] is True and plan["meta"]["fast"]["trials"] > 0


def test_early_critical_needs_xi_clearly_below_zero():
    """A unit that clearly hurts class 0 but whose relative effect on class 1 is large and
    noisy: xi on these samples is slightly negative, yet not significantly, so sequential
    testing must not stop and keep it (the full S may well call it detrimental)."""
    from cswap.pruner.fast import clearly_critical

    rng = np.random.default_rng(0)
    n = 20
    sigma = np.r_[np.full(n, 0.9), np.full(n, 0.05)]
    hurt = 0.5 + 0.01 * rng.standard_normal(n)
    noisy = 0.05 * (1 + rng.choice([-0.9, 0.7], n))  # relative effects -90% or +70%
    groups = np.r_[np.zeros(n, int), np.ones(n, int)]
    test = registry.create("tests", "paired_t", {"effect": "relative"})
    interim = test.with_alpha(0.01)
    star = np.r_[hurt, noisy]
    plain = interim.decide(sigma, star[None, :], groups)[0]
    assert plain.category == "critical" and plain.xi < 0  # what a naive early stop would use
    assert clearly_critical(test, interim, sigma, star, groups, 0.01).category != "critical"
    everywhere = np.r_[hurt, np.full(n, 0.02) + 0.001 * rng.standard_normal(n)]
    assert clearly_critical(test, interim, sigma, everywhere, groups, 0.01).category == "critical"


def test_group_accept_non_critical_removes_detrimental_blocks(trained_cnn):
    """With `group_accept: non_critical` a block is removed when its joint verdict is what
    Algorithm 1 removes for a single unit (neutral or detrimental), never when critical."""
    model, x, y = trained_cnn
    plan, _ = _analysis(model, x, y, {"group_testing": True, "group_accept": "non_critical", "group_size": 4},
                        samples_per_class=20)
    assert plan.meta["fast"]["group_accept"] == "non_critical"
    assert all(s.category in ("neutral", "detrimental") for s in plan.steps if s.phase == "progressive")
    assert all(s.category == "critical" for s in plan.steps if s.phase == "critical")
    assert FastOptions(group_accept="non_critical").accepts("detrimental")
    assert not FastOptions().accepts("detrimental") and not FastOptions(group_accept="non_critical").accepts("critical")
