"""A third-party task whose options are named unlike the built-in classification task's works
with `cswap.analyze`, `cswap curve` and `cswap sweep`: the core asks a task only through the
interface (its M_k, `manifold(seed, samples_per_class)`), never by option name."""
from __future__ import annotations

import csv

import pytest
import yaml

import cswap
from cswap.cli import main

PLUGIN = '''
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cswap.interfaces import Manifold, Task


def blobnet(features: int = 6, hidden: int = 12, labels: int = 3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, labels))


class Blobs(Task):
    """Gaussian blobs; its options share no name with the classification task's."""

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        count_per_label: int = Field(5, ge=2)
        labels: int = 3
        features: int = 6

    def __init__(self, options=None):
        super().__init__(options)
        g = torch.Generator().manual_seed(0)
        o = self.options
        self.centres = 2 * torch.randn(o.labels, o.features, generator=g)

    @property
    def samples_per_class(self):
        return self.options.count_per_label

    @property
    def num_classes(self):
        return self.options.labels

    def _draw(self, per_label, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(self.options.labels).repeat_interleave(per_label)
        return self.centres[y] + torch.randn(len(y), self.options.features, generator=g), y

    def manifold(self, seed, samples_per_class=None):
        n = samples_per_class or self.options.count_per_label
        x, y = self._draw(n, seed)
        return Manifold([(x, y)], {k: n for k in range(self.options.labels)})

    def evaluate(self, model, device="cpu"):
        x, y = self._draw(40, 10_000)  # never S's seeds
        with torch.no_grad():
            return {"accuracy": float((model(x).argmax(1) == y).float().mean())}

    def example_inputs(self):
        return torch.zeros(1, self.options.features)
'''


@pytest.fixture()
def third_party(tmp_path, monkeypatch):
    """A separately 'installed' distribution registering a task and a model builder."""
    (tmp_path / "blobs_plugin.py").write_text(PLUGIN)
    info = tmp_path / "blobs_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: blobs-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cswap.tasks]\nblobs = blobs_plugin:Blobs\n\n"
                                          "[cswap.models]\nblobnet = blobs_plugin:blobnet\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "blobs.yaml"
    config.write_text(yaml.safe_dump({
        "name": "blobs", "seed": 0, "model": {"source": "cswap", "name": "blobnet"},
        "task": {"name": "blobs", "options": {"count_per_label": 6}},
        "output": {"dir": str(tmp_path / "runs"), "latency_repeats": 2}}))
    return config


def test_a_task_with_its_own_option_names_runs_through_analyze_curve_and_sweep(third_party, tmp_path):
    import blobs_plugin

    task, model = blobs_plugin.Blobs(), blobs_plugin.blobnet()
    plan = cswap.analyze(model, task, samples_per_class=4, alpha=0.2, progress=False)
    assert plan.meta["samples"] == 4 * 3  # M_k through the interface, not an option name
    assert len(plan.steps) + len(plan.protected) == 12

    out = tmp_path / "curve"
    assert main(["curve", str(third_party), "--criteria", "cswap,random", "--seeds", "1", "--ratios", "0,0.3",
                 "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader((out / "curve.csv").open()))
    assert {r["criterion"] for r in rows} == {"cswap", "random"}

    out = tmp_path / "sweep"
    assert main(["sweep", str(third_party), "--alpha", "0.05,0.2", "--samples-per-class", "3,5", "--ratios",
                 "0,0.3", "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert sorted((float(r["alpha"]), int(r["samples_per_class"])) for r in rows) == [
        (0.05, 3), (0.05, 5), (0.2, 3), (0.2, 5)]
    assert all(int(r["neutral"]) + int(r["detrimental"]) + int(r["critical"]) <= 12 for r in rows)
