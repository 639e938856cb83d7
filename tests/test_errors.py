"""The rows of docs/errors.md that other test files do not already cover."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cswap import registry
from cswap.build import resolve_adapter
from cswap.cli import main
from cswap.errors import ResourceError
from cswap.interfaces import Scores, ScoringFunction
from cswap.pruner import progressive_prune
from adapters.cifar_resnet import cifar_resnet8
from conftest import patterns


def test_empty_sample_set(tmp_path, config, capsys):
    empty = tmp_path / "empty.npz"
    np.savez(empty, manifold_images=np.zeros((0, 12, 12), np.uint8), manifold_labels=np.zeros(0, np.int64),
             eval_images=np.zeros((3, 12, 12), np.uint8), eval_labels=np.arange(3))
    assert main(["prune", str(config), "--set", f"task.options.root={empty}", "--out", str(tmp_path / "r")]) == 2
    assert "split 'manifold' is empty" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_target_beyond_what_can_be_removed_is_best_effort(tmp_path, config, capsys):
    out = tmp_path / "r"
    with pytest.warns(UserWarning, match="beyond what this plan can remove"):
        assert main(["prune", str(config), "--set", "pruning.params_ratio=0.99", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert 0.3 < report["params_removed_ratio"] < 0.99
    assert "beyond what this plan can remove" in (out / "log.txt").read_text()


class SmallMemoryScorer(ScoringFunction):
    """True-class probability on a 'device' that fits at most 8 samples per batch."""

    def __init__(self):
        self.inner = registry.create("scorers", "class_probability")
        self.sizes = []

    def score(self, outputs, targets) -> Scores:
        self.sizes.append(len(targets))
        if len(targets) > 8:
            raise torch.OutOfMemoryError("simulated: batch too large for the device")
        return self.inner.score(outputs, targets)


def _analysis(scorer, batch_size):
    x, y = patterns(12, size=12)
    torch.manual_seed(0)
    model = cifar_resnet8(width=4, in_channels=1, num_classes=3).eval()
    _, adapter = resolve_adapter("auto", model)
    task = registry.create("tasks", "classification",
                           {"dataset": "tensors", "samples_per_class": 12, "eval_split": "train", "batch_size": batch_size},
                           tensors={"train": (x, y)})
    return progressive_prune(model, adapter.units(model, x[:1]), task.manifold(0), scorer,
                             registry.create("tests", "paired_t"), adapter="resnet", progress=False)


def test_out_of_memory_halves_the_batch_then_fails_clearly():
    scorer = SmallMemoryScorer()
    with pytest.warns(UserWarning, match="out of memory with batches of 36 samples; retrying with 18"):
        plan = _analysis(scorer, batch_size=36)  # 36 -> 18 -> 9 -> 5
    assert max(scorer.sizes[-10:]) <= 8 and plan.steps
    reference = _analysis(registry.create("scorers", "class_probability"), batch_size=9)
    assert [(s.unit, s.category) for s in plan.steps] == [(s.unit, s.category) for s in reference.steps]

    class NoMemory(SmallMemoryScorer):
        def score(self, outputs, targets):
            raise torch.OutOfMemoryError("simulated")

    with pytest.raises(ResourceError, match="one sample per batch"):
        with pytest.warns(UserWarning):
            _analysis(NoMemory(), batch_size=2)
