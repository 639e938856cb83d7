"""The staged engine computes the same plan as full forward passes, with fewer passes' work."""
from __future__ import annotations

import contextlib
import copy
import logging
import re

import numpy as np
import pytest
import timm
import torch
from torch import nn

import cswap
from cswap.build import resolve_adapter
from cswap.engine import FullForward, Staged, make_engine, stage_chain
from cswap.intervention import Intervention
from cswap.models.cifar_resnet import cifar_resnet8
from cswap.tasks.classification import ClassificationTask

from conftest import cswap_plan, patterns, randomize_batchnorm, train
from roundoff import (RELATIVE, ROUNDOFF_FACTOR, RecordingTest, assert_no_knife_edge, decisions, float32_roundoff,
                      xi_tolerance)


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
    task = ClassificationTask.from_tensors(x, y, 20)
    scorer = cswap.registry.create("scorers", "class_probability")
    engine = make_engine("auto", model, scorer, task.manifold(0), graph, adapter.stages(model))
    assert isinstance(engine, Staged) and engine.kind == "staged"
    assert stage_chain("auto", adapter.stages(model), model, x[:2]) is not None  # reproduces the forward
    full = make_engine("full", model, scorer, task.manifold(0), graph, adapter.stages(model))
    assert isinstance(full, FullForward) and full.kind == "full"


def test_an_engine_the_model_cannot_run_is_one_line():
    from cswap.errors import ConfigError

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(ConfigError, match="engine staged needs an adapter with a stage chain"):
        stage_chain("staged", None, model, torch.randn(2, 4))
    broken = [torch.nn.Identity()]  # a chain that does not reproduce the forward
    assert stage_chain("auto", broken, model, torch.randn(2, 4)) is None
    with pytest.raises(ConfigError, match="do not reproduce"):
        stage_chain("delta", broken, model, torch.randn(2, 4))


@pytest.mark.parametrize("seed", [0, 1])
def test_staged_plan_is_bitwise_the_full_forward_plan(model_and_data, seed):
    model, x, y = model_and_data
    full = cswap.analyze(model, (x, y), samples_per_class=20, seed=seed, engine="full", progress=False)
    staged = cswap.analyze(model, (x, y), samples_per_class=20, seed=seed, engine="staged", progress=False)
    assert full.num_noncritical > 0, "no removal: the cache update path would be untested"
    assert staged.to_json() == full.to_json()


def test_delta_engine_gives_the_same_decisions(model_and_data):
    """The rank-one update changes round-off only: the same decisions (on a fixture whose
    decisions round-off cannot move) and xi within round-off of the full forward's."""
    model, x, y = model_and_data
    recorded = RecordingTest(cswap.registry.create("tests", "paired_t", RELATIVE))
    full = cswap_plan(model, ClassificationTask.from_tensors(x, y, 20), test=recorded, engine="full")
    roundoff = float32_roundoff(model, x)
    assert_no_knife_edge(recorded, roundoff)
    delta = cswap.analyze(model, (x, y), samples_per_class=20, seed=0, engine="delta", test_options=RELATIVE,
                          progress=False)
    assert decisions(delta) == decisions(full)
    for a, b in zip(delta.steps, full.steps):
        assert a.xi == pytest.approx(b.xi, rel=0, abs=xi_tolerance(b.xi, roundoff))


# ---- several units per pass: speculative, the plan unchanged ---------------------------
@contextlib.contextmanager
def cswap_log(level=logging.INFO):
    """The messages of the `cswap` logger, whatever handlers or propagation the CLI set up."""
    lines: list[str] = []
    handler = logging.Handler(level)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("cswap")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _engine_parts(model, x, y, samples_per_class=20):
    _, adapter = resolve_adapter("auto", model)
    graph = adapter.units(model, x[:1])
    task = ClassificationTask.from_tensors(x, y, samples_per_class)
    return adapter, graph, task.manifold(0), cswap.registry.create("scorers", "class_probability")


def _batch_invariant_kernels(model: nn.Module, x: torch.Tensor, copies: int = 4) -> bool:
    """Whether this CPU's kernels give every sample the same bits in a batch `copies` times
    larger. torch does not promise it (blocking may depend on the batch size); where it does not
    hold, batched trials agree with single ones to round-off only, and the pruner notices it
    at its one-time check and stops batching (test_unit_batch_gives_the_unbatched_plan)."""
    with torch.no_grad():
        return torch.equal(model(x.repeat(copies, *([1] * (x.dim() - 1))))[:len(x)], model(x))


def _assert_same_scores(a: np.ndarray, b: np.ndarray, bitwise: bool, roundoff: float) -> None:
    if bitwise:
        assert np.array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=ROUNDOFF_FACTOR * roundoff, atol=0)


def test_batched_trials_are_bitwise_single_trials_and_any_can_be_committed(model_and_data):
    model, x, y = model_and_data
    bitwise, roundoff = _batch_invariant_kernels(model, x), float32_roundoff(model, x)
    work = copy.deepcopy(model)
    adapter, graph, manifold, scorer = _engine_parts(work, x, y)
    cut = Intervention(work, graph)
    engine = make_engine("staged", work, scorer, manifold, graph, adapter.stages(work))
    engine.baseline()
    layer = next(layer for layer in graph.layers if layer.channels >= 8 and engine.batchable(layer.name))
    units = layer.units()[:4]
    batched = engine.trials(units)
    for unit, scores in zip(units, batched):
        with cut.trial([unit]):
            single = engine.trial(unit)
        _assert_same_scores(single.values, scores.values, bitwise, roundoff)
    assert len({s.values.tobytes() for s in batched}) == 4  # the copies really differ

    engine.trials(units)
    engine.commit(units[2])  # the third copy's activations become the cache
    cut.cut(units[2])
    after = engine.trials(layer.units()[4:7])
    fresh = make_engine("staged", work, scorer, manifold, graph, adapter.stages(work))
    fresh.baseline()
    for got, want in zip(after, fresh.trials(layer.units()[4:7])):
        _assert_same_scores(got.values, want.values, bitwise, roundoff)
    with pytest.raises(RuntimeError, match="without its complete trial"):
        engine.commit(units[0])  # results of a batch computed before the change are gone


@pytest.mark.parametrize("alpha", [0.05, 1e-4])
def test_unit_batch_gives_the_unbatched_plan(model_and_data, alpha):
    """alpha = 1e-4 makes most units neutral: many removals, so many results computed ahead
    must be thrown away and recomputed."""
    model, x, y = model_and_data
    one = cswap.analyze(model, (x, y), samples_per_class=20, alpha=alpha, engine="staged", progress=False)
    with cswap_log() as lines:
        five = cswap.analyze(model, (x, y), samples_per_class=20, alpha=alpha, engine="staged", progress=False,
                             unit_batch=5)
    assert five.to_json() == one.to_json()
    if not _batch_invariant_kernels(model, x):  # this CPU's kernels: batching was switched off
        assert any("unit_batch switched off" in line for line in lines)
        return
    thrown = int(re.search(r"(\d+) thrown away after removals", "\n".join(lines)).group(1))
    if alpha < 0.01:
        assert one.num_noncritical > 20 and thrown > 0


def test_unit_batch_on_a_vit_gives_the_unbatched_plan():
    """Heads and MLP neurons are read by linear layers on (batch, tokens, features) inputs."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, in_chans=1,
                              embed_dim=16, depth=2, num_heads=2, mlp_ratio=2, num_classes=3).eval()
    x, y = torch.randn(24, 1, 8, 8), torch.arange(3).repeat(8)
    one = cswap.analyze(model, (x, y), samples_per_class=8, alpha=0.2, progress=False)
    four = cswap.analyze(model, (x, y), samples_per_class=8, alpha=0.2, progress=False, unit_batch=4)
    assert one.num_noncritical > 0 and four.to_json() == one.to_json()


class _MemoryCap(nn.Module):
    """Stands for a device that holds at most `limit` samples in a pass: larger inputs raise
    the out-of-memory error a GPU raises."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"{x.shape[0]} samples do not fit")
        return x


def test_unit_batch_shrinks_when_memory_runs_out():
    x, y = patterns(20, classes=3, size=8, seed=1)
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 3))
    body = train(body, x, y, steps=60)
    capped = nn.Sequential(*body, _MemoryCap(limit=2 * 60))  # S is one batch of 60: two copies fit
    one = cswap.analyze(body, (x, y), samples_per_class=20, progress=False)
    with cswap_log(logging.WARNING) as lines:
        eight = cswap.analyze(capped, (x, y), samples_per_class=20, progress=False, unit_batch=8)
    assert any("now 4 at a time" in line for line in lines) and any("now 2 at a time" in line for line in lines)
    assert [s.to_json() for s in eight.steps] == [s.to_json() for s in one.steps]


def test_unit_batch_must_be_positive_and_exact():
    from cswap.options import FastOptions, PruningOptions

    assert PruningOptions(unit_batch="auto").unit_batch == "auto"
    with pytest.raises(ValueError, match="at least 1"):
        PruningOptions(unit_batch=0)
    with pytest.raises(ValueError, match="cannot be combined with fast"):
        PruningOptions(unit_batch=4, fast=FastOptions(group_testing=True))
