"""Same seed, same plan: what is promised across runs, thread counts and machines (README,
"What exact means").

- The same config, seed, thread count and kernels give a byte-identical `plan.json` (also
  tests/test_reliability.py::test_same_config_same_plan_bytes, through the CLI).
- Another thread count or CPU may round differently: the plan then has the same units,
  categories and order, and xi / p-values equal to float32 round-off, as long as no decision
  lies within round-off of a threshold (a p-value at alpha, a score difference at the zero
  tolerance, two critical xi tied). This fixture is checked to have no such decision.
"""
from __future__ import annotations

import json

import pytest
import torch

from cswap import registry
from cswap.models.cifar_resnet import cifar_resnet8
from cswap.tasks.classification import ClassificationTask

from conftest import cswap_plan, patterns, randomize_batchnorm, train
from roundoff import RELATIVE, RecordingTest, assert_no_knife_edge, decisions, float32_roundoff, xi_tolerance


@pytest.fixture(scope="module")
def model_and_data():
    x, y = patterns(20, classes=3, size=12, seed=6)
    torch.manual_seed(7)
    model = train(randomize_batchnorm(cifar_resnet8(width=6, in_channels=1, num_classes=3)).train(), x, y, steps=80)
    return model, x, y


def _analyze(model, x, y, threads: int, test=None):
    task = ClassificationTask.from_tensors(x, y, 20)
    test = test or registry.create("tests", "paired_t", {"alpha": 1e-3, **RELATIVE})
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return cswap_plan(model, task, 4, test=test)
    finally:
        torch.set_num_threads(before)


def test_same_thread_count_gives_byte_identical_plans(model_and_data):
    model, x, y = model_and_data
    first, second = (json.dumps(_analyze(model, x, y, 2).to_json()) for _ in range(2))
    assert first == second


def test_other_thread_counts_give_the_same_decisions(model_and_data):
    model, x, y = model_and_data
    roundoff = float32_roundoff(model, x)
    recorded = RecordingTest(registry.create("tests", "paired_t", {"alpha": 1e-3, **RELATIVE}))
    reference = _analyze(model, x, y, 1, recorded)
    assert_no_knife_edge(recorded, roundoff)
    assert reference.num_noncritical > 3 and len(reference.steps) > reference.num_noncritical  # both phases
    for threads in (2, 3):
        plan = _analyze(model, x, y, threads)
        assert decisions(plan) == decisions(reference), threads
        for mine, ref in zip(plan.steps, reference.steps):
            assert mine.xi == pytest.approx(ref.xi, rel=0, abs=xi_tolerance(ref.xi, roundoff))
