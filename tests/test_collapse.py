"""Never silently at chance (cswap/collapse.py, issue #27): a replay past the plan's floor
names the layer and its width, and a model near chance on S is said to be, with chance and
the unpruned accuracy beside it; a healthy replay says nothing."""
from __future__ import annotations

import copy

import torch
from torch import nn

from cswap.build import resolve_adapter
from cswap.collapse import collapse, collapse_lines
from cswap.interfaces import CRITICAL_RANKED, PlanStep
from cswap.options import AnalysisOptions
from cswap.plan import PruningPlan
from cswap.tail_order import kept_tail
from cswap.tasks.classification import ClassificationTask

from conftest import patterns, train


def _cnn() -> nn.Module:
    """No skip connection, so every convolution is a bottleneck the floor holds."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def _case():
    x, y = patterns(30, classes=3, size=8, seed=1)
    model = train(_cnn(), x, y, steps=150).eval()
    task = ClassificationTask.from_tensors(x, y, samples_per_class=10)
    _, adapter = resolve_adapter("auto", model)
    graph = adapter.units(model, x[:1])
    tail = [PlanStep(u, CRITICAL_RANKED, xi=-1.0 - 0.01 * i) for i, u in enumerate(
        u for layer in graph.layers for u in layer.units())]
    ordered, meta = kept_tail(AnalysisOptions(), model, graph, [], tail, lambda s: -s.xi)
    plan = PruningPlan.build(model, graph, ordered, method="cswap", adapter="generic", meta=meta)
    return model, task, graph, plan


def test_a_replay_past_the_floor_names_the_layer_and_its_width():
    model, task, graph, plan = _case()
    floor = AnalysisOptions().min_width
    width = dict(plan.layers)
    above = sum(w - floor.of(w) for w in width.values())
    sample_set = task.manifold(0)
    held = collapse(plan, [s.unit for s in plan.steps[:above]], task, model, graph, model, sample_set, "cpu")
    assert held["thin_layers"] == [] and held["lines"] == []
    past = plan.steps[above].unit.layer  # the first unit taken below a floor
    c = collapse(plan, [s.unit for s in plan.steps[:above + 1]], task, model, graph, model, sample_set, "cpu")
    assert c["thin_layers"] == [{"layer": past, "width": floor.of(width[past]) - 1, "of": width[past],
                                 "floor": floor.of(width[past])}]
    assert len(c["lines"]) == 1 and f"{past} {floor.of(width[past]) - 1}/{width[past]}" in c["lines"][0]


def test_a_model_near_chance_on_s_is_said_to_be():
    """The same model with a classifier that answers one class: S accuracy is the chance
    level exactly (S is balanced), far below the trained model's, and the summary says so."""
    model, task, graph, plan = _case()
    dead = copy.deepcopy(model)
    with torch.no_grad():
        dead[-1].weight.zero_()
        dead[-1].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    sample_set = task.manifold(0)
    c = collapse(plan, [], task, model, graph, dead, sample_set, "cpu")
    assert abs(c["chance"] - 1 / 3) < 1e-12 and abs(c["s_accuracy_after"] - 1 / 3) < 1e-12
    assert c["s_accuracy_before"] > 0.9
    assert len(c["lines"]) == 1 and "near chance on S: 33.3%" in c["lines"][0] and "unpruned" in c["lines"][0]
    healthy = collapse(plan, [], task, model, graph, model, sample_set, "cpu")
    assert healthy["lines"] == [] and healthy["s_accuracy_after"] == healthy["s_accuracy_before"]
    # the rule: less than a quarter of the margin over chance kept
    assert collapse_lines({"thin_layers": [], "chance": 0.1, "s_accuracy_before": 0.9, "s_accuracy_after": 0.29})
    assert not collapse_lines({"thin_layers": [], "chance": 0.1, "s_accuracy_before": 0.9, "s_accuracy_after": 0.31})
