"""The staged engine computes the same plan as full forward passes, with fewer passes' work."""
from __future__ import annotations

import pytest
import torch

import cswap
from adapters.cifar_resnet import cifar_resnet8
from conftest import patterns, randomize_batchnorm, train
from cswap.build import resolve_adapter
from cswap.engine import FullForward, Staged, make_engine


@pytest.fixture(scope="module")
def model_and_data():
    x, y = patterns(20, classes=3, size=12, seed=11)
    torch.manual_seed(3)
    model = train(randomize_batchnorm(cifar_resnet8(width=6, in_channels=1, num_classes=3)).train(), x, y, steps=40)
    return model, x, y


def test_auto_picks_staged_for_resnet(model_and_data):
    model, x, y = model_and_data
    _, adapter = resolve_adapter("auto", model)
    graph = adapter.units(model, x[:1])
    task = cswap.registry.create("tasks", "classification",
                                 {"dataset": "tensors", "samples_per_class": 20, "eval_split": "train"},
                                 tensors={"train": (x, y)})
    scorer = cswap.registry.create("scorers", "class_probability")
    engine = make_engine("auto", model, scorer, task.manifold(0), graph, adapter.stages(model))
    assert isinstance(engine, Staged) and engine.check_equals_forward()
    assert isinstance(make_engine("full", model, scorer, task.manifold(0), graph, adapter.stages(model)), FullForward)


@pytest.mark.parametrize("seed", [0, 1])
def test_staged_plan_is_bitwise_the_full_forward_plan(model_and_data, seed):
    model, x, y = model_and_data
    full = cswap.analyze(model, (x, y), samples_per_class=20, seed=seed, engine="full", progress=False)
    staged = cswap.analyze(model, (x, y), samples_per_class=20, seed=seed, engine="staged", progress=False)
    assert full.num_noncritical > 0, "no removal: the cache update path would be untested"
    assert staged.to_json() == full.to_json()


def test_delta_engine_gives_the_same_decisions(model_and_data):
    model, x, y = model_and_data
    full = cswap.analyze(model, (x, y), samples_per_class=20, engine="full", progress=False)
    delta = cswap.analyze(model, (x, y), samples_per_class=20, engine="delta", progress=False)
    assert [(s.unit, s.category) for s in delta.steps] == [(s.unit, s.category) for s in full.steps]
    for a, b in zip(delta.steps, full.steps):
        assert a.xi == pytest.approx(b.xi, abs=1e-6)
