"""The order of the kept tail (`pruning.critical_order`, cswap/tail_order.py).

The tail order is read only after the walk: it must leave every removal decision as it was,
put the same kept units in the promised order, and equal the reordering of a plan made with
the paper's order (what benchmarks/recovery.py derives from its cached plans).
"""
from __future__ import annotations

import random

import torch

from cswap.build import resolve_adapter
from cswap.interfaces import PROGRESSIVE
from cswap.removal import ParamLedger
from cswap.tail_order import order_tail
from cswap.tasks.classification import ClassificationTask

from conftest import cswap_plan, patterns, randomize_batchnorm, train


def _trained_resnet():
    from cswap.models.cifar_resnet import cifar_resnet8

    x, y = patterns(20, classes=3, size=12, seed=11)
    torch.manual_seed(3)
    model = train(randomize_batchnorm(cifar_resnet8(width=6, in_channels=1, num_classes=3)).train(), x, y, steps=40)
    return model.eval(), ClassificationTask.from_tensors(x, y, samples_per_class=20)


def test_ledger_cost_is_what_removal_frees_and_accounts_nothing():
    model, task = _trained_resnet()
    _, adapter = resolve_adapter("auto", model)
    graph = adapter.units(model, task.example_inputs())
    units = [u for layer in graph.layers for u in layer.units()]
    random.Random(0).shuffle(units)
    ledger = ParamLedger(model, graph)
    for unit in units[: len(units) // 2]:
        shapes, removed = {n: list(s) for n, s in ledger.shapes.items()}, ledger.removed
        cost = ledger.cost(unit)
        assert ledger.shapes == shapes and ledger.removed == removed
        assert ledger.remove(unit) == cost > 0 and ledger.removed == removed + cost


def _split(plan):
    k = plan.num_noncritical
    return plan.steps[:k], plan.steps[k:]


def test_per_parameter_order_changes_only_the_tail(one_thread):
    """Same walk, same removals and verdicts; the kept units in the greedy harm-per-parameter
    order (checked against its brute-force definition), which differs from the effect order
    here (so the test is not vacuous) and equals reordering the effect plan's tail."""
    model, task = _trained_resnet()
    by_effect = cswap_plan(model, task, critical_order="effect")
    per_param = cswap_plan(model, task, critical_order="effect_per_param")
    (head_e, tail_e), (head_p, tail_p) = _split(by_effect), _split(per_param)
    assert [s.to_json() for s in head_e] == [s.to_json() for s in head_p]
    assert all(s.phase == PROGRESSIVE for s in head_p) and len(tail_p) > 10
    assert sorted(str(s.unit) for s in tail_e) == sorted(str(s.unit) for s in tail_p)
    assert [s.unit for s in tail_e] != [s.unit for s in tail_p]
    assert [s.xi for s in tail_e] == sorted((s.xi for s in tail_e), reverse=True)  # the paper's order
    assert [str(s.unit) for s in tail_p] == _naive_greedy(model, _graph(model, task), head_p, tail_e, lambda s: -s.xi)
    reordered = order_tail(model, _graph(model, task), head_e, tail_e, lambda s: -s.xi, "effect_per_param")
    assert [str(s.unit) for s in reordered] == [str(s.unit) for s in tail_p]
    assert per_param.meta["critical_order"] == "effect_per_param" and "critical_order" not in by_effect.meta


def test_amp_tail_follows_the_same_option(one_thread):
    from cswap import registry
    from cswap.build import analysis_for
    from cswap.options import PruningOptions
    from cswap.plan import PruningPlan

    model, task = _trained_resnet()
    plans = {}
    for order in ("effect", "effect_per_param"):
        a = analysis_for(model, task, progress=False, options=PruningOptions(verify_units=False, critical_order=order))
        ranking = registry.create("criteria", "amp", {"tau": 0.002}).rank(a, 0)
        plans[order] = PruningPlan.from_ranking(model, a.units, ranking, adapter=a.adapter_name)
    (head_e, tail_e), (head_p, tail_p) = _split(plans["effect"]), _split(plans["effect_per_param"])
    assert [s.to_json() for s in head_e] == [s.to_json() for s in head_p] and len(tail_p) > 10
    assert [s.score for s in tail_e] == sorted(s.score for s in tail_e)
    reordered = order_tail(model, _graph(model, task), head_e, tail_e, lambda s: s.score, "effect_per_param")
    assert [str(s.unit) for s in reordered] == [str(s.unit) for s in tail_p] != [str(s.unit) for s in tail_e]
    assert [str(s.unit) for s in tail_p] == _naive_greedy(model, _graph(model, task), head_p, tail_e, lambda s: s.score)


def _naive_greedy(model, graph, head, tail, harm) -> list[str]:
    """The definition, by brute force: take, again and again, the remaining unit of least harm
    per parameter it frees now (a layer's last unit is never removed, so it frees nothing)."""
    ledger = ParamLedger(model, graph)
    left = {layer.name: layer.channels for layer in graph.layers}
    for s in head:
        ledger.remove(s.unit)
        left[s.unit.layer] -= 1
    todo, out = list(tail), []
    while todo:
        best = min(todo, key=lambda s: harm(s) / max(ledger.cost(s.unit), 1))
        todo.remove(best)
        if left[best.unit.layer] > 1:
            ledger.remove(best.unit)
            left[best.unit.layer] -= 1
        out.append(str(best.unit))
    return out


def _graph(model, task):
    _, adapter = resolve_adapter("auto", model)
    return adapter.units(model, task.example_inputs())
