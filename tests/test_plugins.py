"""A plugin from outside the project's distribution is found and used with no core change."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import cswap
from cswap import registry

PLUGIN = '''
import numpy as np
import torch
from cswap.interfaces import Scores, ScoringFunction

CALLS = []


class ExternalProbability(ScoringFunction):
    """True-class probability, counting its calls so a test can see it was used."""

    def score(self, outputs, targets):
        CALLS.append(len(targets))
        p = torch.softmax(outputs.double(), 1).gather(1, targets.view(-1, 1)).squeeze(1)
        return Scores(p.numpy(), targets.numpy().astype(np.int64))
'''


@pytest.fixture()
def plugin_dir(tmp_path, monkeypatch):
    """A fake installed distribution: a module plus its *.dist-info with entry_points.txt."""
    (tmp_path / "extplug_scorers.py").write_text(PLUGIN)
    info = tmp_path / "extplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: extplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[cswap.scorers]\next_probability = extplug_scorers:ExternalProbability\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_external_plugin_is_listed_and_used(plugin_dir, trained_mlp):
    infos = {(r.kind, r.name): r.distribution for r in registry.describe()}
    assert infos[("scorers", "ext_probability")] == "extplug"
    model, x, y = trained_mlp
    ours = cswap.analyze(model, (x, y), samples_per_class=40, progress=False)
    theirs = cswap.analyze(model, (x, y), samples_per_class=40, scorer="ext_probability", progress=False)
    import extplug_scorers

    assert sum(extplug_scorers.CALLS) > 0
    assert [(s.unit, s.category) for s in theirs.steps] == [(s.unit, s.category) for s in ours.steps]


def test_cli_lists_external_plugin(plugin_dir):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "cswap", "list"], env=env, capture_output=True, text=True, check=True)
    line = next(l for l in out.stdout.splitlines() if "ext_probability" in l)
    assert "[extplug]" in line
    assert "classification" in out.stdout and "[cswap]" in out.stdout


def test_unknown_plugin_lists_available():
    with pytest.raises(registry.UnknownPluginError, match="available: .*class_probability"):
        registry.load("scorers", "nope")
