"""`pruning.precision`: reduced-precision trials are opt-in, compared like with like, and leave
the baseline sigma fp32; fp32 changes nothing."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import cswap
from cswap.build import resolve_adapter
from cswap.engine import make_engine
from cswap.errors import ConfigError
from cswap.models.cifar_resnet import cifar_resnet8
from cswap.precision import ReducedPrecision, with_precision
from cswap.tasks.classification import ClassificationTask

from conftest import blobs, patterns, randomize_batchnorm, small_mlp, train


@pytest.fixture(scope="module")
def resnet():
    x, y = patterns(12, classes=3, size=10, seed=2)
    torch.manual_seed(0)
    return train(randomize_batchnorm(cifar_resnet8(width=6, in_channels=1, num_classes=3)).train(), x, y, 30), x, y


def _engine(model, x, y, kind="staged"):
    _, adapter = resolve_adapter("auto", model)
    graph = adapter.units(model, x[:1])
    manifold = ClassificationTask.from_tensors(x, y, len(y) // 3).manifold(0)
    scorer = cswap.registry.create("scorers", "class_probability")
    return make_engine(kind, model, scorer, manifold, graph, adapter.stages(model)), graph


def test_fp32_is_the_engine_itself_and_adds_nothing_to_the_plan(resnet):
    model, x, y = resnet
    engine, _ = _engine(model, x, y)
    assert with_precision(engine, "fp32", "cpu") is engine
    plan = cswap.analyze(model, (x, y), samples_per_class=12, progress=False)
    assert "precision" not in plan.meta
    assert cswap.PruningOptions().precision == "fp32"


def test_tf32_is_refused_on_cpu_and_fast_modes_are_refused():
    engine = object()
    with pytest.raises(ConfigError, match="only CUDA"):
        with_precision(engine, "tf32", "cpu")
    with pytest.raises(ValueError, match="cannot be combined with fast"):
        cswap.PruningOptions(precision="bf16", fast={"sequential": True})


@pytest.mark.parametrize("kind", ["full", "staged"])
def test_a_cut_that_changes_nothing_changes_nothing_in_bf16(kind):
    """A dead unit (no input weights, no bias): its cut leaves every bf16 product as it was, so
    sigma* equals sigma exactly, while bf16 against the fp32 sigma would see round-off."""
    x, y = blobs(20, classes=3, dim=8, seed=3)
    model = train(small_mlp(), x, y, steps=100)
    with torch.no_grad():
        model[0].weight[5].zero_()
        model[0].bias[5] = 0.0
    from cswap.discovery import discover

    graph = discover(model, x[:1])
    layer = next(layer for layer in graph.layers if layer.channels == 16)
    manifold = ClassificationTask.from_tensors(x, y, 20).manifold(0)
    scorer = cswap.registry.create("scorers", "class_probability")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    raw = make_engine(kind, a, scorer, manifold, graph, list(a) if kind == "staged" else None)
    engine = with_precision(make_engine(kind, b, scorer, manifold, graph, list(b) if kind == "staged" else None),
                            "bf16", "cpu")
    assert isinstance(engine, ReducedPrecision)
    base = engine.baseline()
    np.testing.assert_array_equal(base.values, raw.baseline().values)  # the baseline is fp32
    dead = engine.trial(cswap.Unit(layer.name, 5))
    np.testing.assert_array_equal(dead.values, base.values)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = raw.trial(cswap.Unit(layer.name, 5))
    assert not np.array_equal(naive.values, base.values)  # what comparing with fp32 would have seen
    live = engine.trial(cswap.Unit(layer.name, 0))
    exact = raw.trial(cswap.Unit(layer.name, 0))
    assert np.abs(live.values - exact.values).max() < 0.05  # bf16's effect is near the fp32 one


def test_a_removal_keeps_the_baseline_and_the_cache_fp32(resnet):
    model, x, y = resnet
    raw, graph = _engine(copy.deepcopy(model), x, y)
    engine = with_precision(_engine(copy.deepcopy(model), x, y)[0], "bf16", "cpu")
    engine.baseline()
    raw.baseline()
    layer = next(layer for layer in graph.layers if layer.channels >= 4)
    u, v = layer.units()[:2]
    engine.trial(u)
    exact = engine.commit(u)  # the new network's sigma, in fp32
    want = raw.trial(u)
    raw.commit(u)
    np.testing.assert_array_equal(exact.values, want.values)
    for mine, theirs in zip(engine.engine.inputs, raw.inputs):  # the staged cache: fp32, the same bits
        assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(mine, theirs))
    # the next trial is compared with the uncut network as it now stands
    shifted = engine.trial(v)
    fp32 = raw.trial(v)
    assert np.abs(shifted.values - fp32.values).max() < 0.05


def test_bf16_analysis_records_its_precision_and_keeps_most_decisions(resnet):
    model, x, y = resnet
    exact = cswap.analyze(model, (x, y), samples_per_class=12, progress=False)
    bf16 = cswap.analyze(model, (x, y), samples_per_class=12, progress=False, precision="bf16")
    assert bf16.meta["precision"] == "bf16"
    cat = {str(s.unit): s.category for s in exact.steps}
    agree = np.mean([cat[str(s.unit)] == s.category for s in bf16.steps])
    assert agree >= 0.85, agree
    with_batches = cswap.analyze(model, (x, y), samples_per_class=12, progress=False, precision="bf16", unit_batch=3)
    assert with_batches.to_json() == bf16.to_json()  # speculation stays exact in bf16 too
