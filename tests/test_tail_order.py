"""The order of the kept tail (`pruning.critical_order`, cswap/tail_order.py).

The tail order is read only after the walk: it must leave every removal decision as it was,
put the same kept units in the promised order, and equal the reordering of a plan made with
the paper's order (what benchmarks/recovery.py derives from its cached plans). The orders
that keep layers from emptying (issue #27: a thinning harm, a floor per layer) are checked
against their brute-force definitions, and on a model built so that its last layer's units
are the cheapest per harm, where the per-parameter order empties that layer first.
"""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from cswap.build import resolve_adapter
from cswap.interfaces import PROGRESSIVE
from cswap.options import AnalysisOptions, MinWidth
from cswap.removal import ParamLedger
from cswap.tail_order import (
    NO_FLOOR, THINNING, ThinLayer, bottleneck_layers, kept_tail, layers_below_floor, order_tail, widths_after,
)
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


def _floor(share: float, minimum: int) -> MinWidth:
    return MinWidth(share=share, minimum=minimum)


def _split(plan):
    k = plan.num_noncritical
    return plan.steps[:k], plan.steps[k:]


@pytest.fixture(scope="module")
def resnet_by_effect():
    """The trained ResNet, its task and its plan with the paper's tail order (one analysis
    for every test that reorders a tail)."""
    model, task = _trained_resnet()
    return model, task, cswap_plan(model, task, critical_order="effect")


def test_per_parameter_order_changes_only_the_tail(one_thread, resnet_by_effect):
    """Same walk, same removals and verdicts; the kept units in the greedy harm-per-parameter
    order (checked against its brute-force definition), which differs from the effect order
    here (so the test is not vacuous) and equals reordering the effect plan's tail."""
    model, task, by_effect = resnet_by_effect
    per_param = cswap_plan(model, task, critical_order="effect_per_param", min_width="none")
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
    assert "bottlenecks" not in per_param.meta  # a floorless per-parameter order probes nothing


def test_default_plan_is_the_reordered_paper_plan_and_records_its_floor(one_thread, resnet_by_effect):
    """The default analysis (its order with the floor on the probed bottlenecks) has the
    paper plan's walk, and its tail is that plan's tail put in the default's order by
    definition, which the floor changes here (so the check is not vacuous); the plan records
    the order, the floor and the bottlenecks a replay checks widths on."""
    model, task, by_effect = resnet_by_effect
    default = cswap_plan(model, task)
    (head_e, tail_e), (head_d, tail_d) = _split(by_effect), _split(default)
    assert [s.to_json() for s in head_e] == [s.to_json() for s in head_d]
    options, graph, harm = AnalysisOptions(), _graph(model, task), (lambda s: -s.xi)
    floor, order = options.min_width, options.critical_order
    assert [str(s.unit) for s in tail_d] == _naive_greedy(model, graph, head_e, tail_e, harm, order, floor, 1.0,
                                                          RESNET8_STREAMS)
    assert [str(s.unit) for s in tail_d] != _naive_greedy(model, graph, head_e, tail_e, harm, order)
    assert default.meta["critical_order"] == order and default.meta["min_width"] == floor.model_dump()
    assert default.meta["bottlenecks"] == sorted(RESNET8_STREAMS)


def test_amp_tail_follows_the_same_option(one_thread):
    from cswap import registry
    from cswap.build import analysis_for
    from cswap.options import PruningOptions
    from cswap.plan import PruningPlan

    model, task = _trained_resnet()
    plans = {}
    for order, more in (("effect", {}), ("effect_per_param", {"min_width": "none"}), (THINNING, {})):
        options = PruningOptions(verify_units=False, critical_order=order, **more)
        a = analysis_for(model, task, progress=False, options=options)
        ranking = registry.create("criteria", "amp", {"tau": 0.002}).rank(a, 0)
        plans[order] = PruningPlan.from_ranking(model, a.units, ranking, adapter=a.adapter_name)
    (head_e, tail_e), (head_p, tail_p) = _split(plans["effect"]), _split(plans["effect_per_param"])
    assert [s.to_json() for s in head_e] == [s.to_json() for s in head_p] and len(tail_p) > 10
    assert [s.score for s in tail_e] == sorted(s.score for s in tail_e)
    reordered = order_tail(model, _graph(model, task), head_e, tail_e, lambda s: s.score, "effect_per_param")
    assert [str(s.unit) for s in reordered] == [str(s.unit) for s in tail_p] != [str(s.unit) for s in tail_e]
    assert [str(s.unit) for s in tail_p] == _naive_greedy(model, _graph(model, task), head_p, tail_e, lambda s: s.score)
    thinning = [str(s.unit) for s in _split(plans[THINNING])[1]]  # with the default floor on the bottlenecks
    assert thinning == _naive_greedy(model, _graph(model, task), head_e, tail_e, lambda s: s.score, THINNING,
                                     AnalysisOptions().min_width, 1.0, RESNET8_STREAMS)
    assert plans[THINNING].meta["bottlenecks"] == sorted(RESNET8_STREAMS)


def _naive_greedy(model, graph, head, tail, harm, order="effect_per_param", floor=NO_FLOOR, power=1.0,
                  bottlenecks=None) -> list[str]:
    """The definition, by brute force: take, again and again, the remaining unit of least harm
    (per parameter it frees now; in a bottleneck grown by (width / remaining) ** power when
    thinning, divided when the harm is negative) among those whose layer is not a bottleneck
    at or below its floor, or among all when none is (a layer's last unit is never removed,
    so it frees nothing). `bottlenecks` None: every layer."""
    ledger = ParamLedger(model, graph)
    width = {layer.name: layer.channels for layer in graph.layers}
    bottlenecks = set(width) if bottlenecks is None else set(bottlenecks)
    floors = {name: floor.of(w) if name in bottlenecks else 1 for name, w in width.items()}
    left = dict(width)
    for s in head:
        ledger.remove(s.unit)
        left[s.unit.layer] -= 1

    def score(s):
        h, layer = harm(s), s.unit.layer
        if order == "effect":
            return h
        grown = (width[layer] / left[layer]) ** power if order == THINNING and layer in bottlenecks else 1.0
        return (h * grown if h > 0 else h / grown) / max(ledger.cost(s.unit), 1)

    todo, out = list(tail), []
    while todo:
        above = [s for s in todo if floors[s.unit.layer] <= 1 or left[s.unit.layer] > floors[s.unit.layer]]
        best = min(above or todo, key=score)
        todo.remove(best)
        if left[best.unit.layer] > 1:
            ledger.remove(best.unit)
            left[best.unit.layer] -= 1
        out.append(str(best.unit))
    return out


def _graph(model, task):
    _, adapter = resolve_adapter("auto", model)
    return adapter.units(model, task.example_inputs())


RESNET8_STREAMS = {"conv1", "layer2.0.downsample.0", "layer3.0.downsample.0"}  # its residual streams


@pytest.mark.parametrize("order, floor, power, bottlenecks", [
    (THINNING, NO_FLOOR, 1.0, "every"),
    (THINNING, _floor(0.25, 2), 2.0, "every"),
    ("effect_per_param", _floor(0.5, 2), 1.0, "every"),
    ("effect", _floor(0.5, 3), 1.0, "every"),
    (THINNING, _floor(0.5, 2), 1.0, "probed"),
])
def test_bottleneck_aware_orders_follow_their_definition(one_thread, resnet_by_effect, order, floor, power,
                                                         bottlenecks):
    """Each order with a floor and a thinning power, on every layer or on the probed
    bottlenecks (the default), is its brute-force definition, a permutation of the tail, and
    (so the check is not vacuous) not the order without them."""
    model, task, plan = resnet_by_effect
    graph, harm = _graph(model, task), (lambda s: -s.xi)
    head, tail = _split(plan)
    names = [layer.name for layer in graph.layers] if bottlenecks == "every" else None
    ordered = [str(s.unit) for s in order_tail(model, graph, head, tail, harm, order, floor, power, names)]
    assert ordered == _naive_greedy(model, graph, head, tail, harm, order, floor, power, names or RESNET8_STREAMS)
    assert sorted(ordered) == sorted(str(s.unit) for s in tail)
    plain = "effect_per_param" if order == THINNING else order
    assert ordered != [str(s.unit) for s in order_tail(model, graph, head, tail, harm, plain)]


def test_bypassed_layers_keep_the_per_parameter_order(one_thread, resnet_by_effect):
    """The probe finds the ResNet's residual streams and none of the convolutions inside its
    blocks (a skip connection bypasses those); with no bottleneck the thinning order and its
    floor are the per-parameter order, unit for unit."""
    model, task, plan = resnet_by_effect
    graph = _graph(model, task)
    assert bottleneck_layers(model, graph) == RESNET8_STREAMS
    assert {layer.name for layer in graph.layers} - RESNET8_STREAMS == {
        f"layer{i}.0.conv1" for i in (1, 2, 3)}
    head, tail = _split(plan)
    per_param = order_tail(model, graph, head, tail, lambda s: -s.xi, "effect_per_param")
    free = order_tail(model, graph, head, tail, lambda s: -s.xi, THINNING, _floor(0.5, 4), 2.0, bottlenecks=())
    assert [str(s.unit) for s in free] == [str(s.unit) for s in per_param]


class _FlattenedCNN(nn.Module):
    """Three convolutions, the last read through a flatten: each of its channels frees 9 * 6
    weights, 2 BatchNorm values and 16 * 10 classifier weights, more than any other unit."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.classifier = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def test_default_never_thins_the_cheapest_layer_below_its_floor():
    """Every unit kept, harms drawn so that the last convolution's units are the cheapest per
    harm: the per-parameter order takes that layer to one channel first (issue #27); the
    default takes no layer below its floor while any layer has units above its own, and the
    plan it builds names no thin layer until then. The default is read from the options, so
    the test follows it if the benchmark picks another."""
    from cswap.interfaces import CRITICAL_RANKED, PlanStep
    from cswap.plan import PruningPlan

    torch.manual_seed(0)
    model = randomize_batchnorm(_FlattenedCNN())
    _, adapter = resolve_adapter("auto", model)
    graph = adapter.units(model, torch.zeros(1, 1, 8, 8))
    width = {layer.name: layer.channels for layer in graph.layers}
    last = max(graph.layers, key=lambda layer: layer.position).name
    rng = random.Random(0)
    tail = [PlanStep(u, CRITICAL_RANKED, xi=-rng.uniform(1.0, 1.5)) for layer in graph.layers for u in layer.units()]
    ledger = ParamLedger(model, graph)
    cost = {layer.name: ledger.cost(layer.units()[0]) for layer in graph.layers}
    assert cost[last] == 6 * 9 + 2 + 16 * 10 and cost[last] > 1.5 * max(c for n, c in cost.items() if n != last)
    greedy = order_tail(model, graph, [], tail, lambda s: -s.xi, "effect_per_param")
    assert [s.unit.layer for s in greedy[:width[last] - 1]] == [last] * (width[last] - 1)

    assert bottleneck_layers(model, graph) == set(width)  # no skip connection: every layer is one
    default = AnalysisOptions()
    floor = default.min_width
    assert not floor.trivial and floor.of(width[last]) > 1
    ordered, meta = kept_tail(default, model, graph, [], tail, lambda s: -s.xi)
    assert meta["bottlenecks"] == sorted(width) and meta["min_width"] == floor.model_dump()
    above = sum(w - floor.of(w) for w in width.values())
    for k in range(len(ordered) + 1):
        after = widths_after(width, (s.unit.layer for s in ordered[:k]))
        thin = layers_below_floor(width, after, floor)
        assert (thin == []) == (k <= above), k
        assert k > above or after[last] >= floor.of(width[last])
    plan = PruningPlan.build(model, graph, ordered, method="cswap", adapter="generic", meta=meta)
    assert layers_below_floor(width, widths_after(width, (s.unit.layer for s in plan.steps[:above])), floor) == []
    # past the floors the tail goes on, to the plan's own limit of one unit per layer
    assert widths_after(width, (s.unit.layer for s in plan.steps)) == {name: 1 for name in width}


def test_floor_and_thin_layers_are_exact():
    assert [_floor(0.25, 2).of(w) for w in (1, 2, 3, 8, 9, 16)] == [1, 2, 2, 2, 3, 4]
    assert _floor(0.1, 1).of(30) == 3 and NO_FLOOR.of(64) == 1 and _floor(1.0, 1).of(5) == 5
    for bad in ((-0.1, 1), (1.5, 1), (0.2, 0)):
        with pytest.raises(ValueError):
            _floor(*bad)
    widths = {"a": 16, "b": 8, "c": 3}
    after = widths_after(widths, ["a"] * 13 + ["b"] * 6 + ["c"])
    assert after == {"a": 3, "b": 2, "c": 2}
    assert layers_below_floor(widths, after, _floor(0.25, 2)) == [ThinLayer("a", 16, 3, 4)]
    assert layers_below_floor(widths, after, _floor(0.5, 3)) == [
        ThinLayer("a", 16, 3, 8), ThinLayer("b", 8, 2, 4), ThinLayer("c", 3, 2, 3)]
    assert layers_below_floor(widths, {}, _floor(0.5, 3)) == []
    assert layers_below_floor(widths, after, _floor(0.5, 3), bottlenecks={"b"}) == [ThinLayer("b", 8, 2, 4)]
