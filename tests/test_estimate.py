"""Honest time: the dry run's |S|, engine, probe and estimate; the console line of a run; a
resumed analysis accounted as a whole; the progress bar's rate untouched by replays."""
from __future__ import annotations

import re

import pytest
import torch

from cswap.cli import main
from cswap.config import load_config


def _dry_run(config, capsys, *overrides) -> str:
    sets = [a for o in overrides for a in ("--set", o)]
    assert main(["prune", str(config), "--dry-run", *sets]) == 0
    return capsys.readouterr().out


def test_dry_run_says_sample_set_engine_trials_probe_and_time(config, capsys):
    from cswap.build import analysis_from_config
    from cswap.estimate import estimate

    out = _dry_run(config, capsys)
    a, _ = analysis_from_config(load_config(config), on_device=False)
    samples = len(a.task.manifold(load_config(config).seed))
    assert f"sample set |S| = {samples} samples" in out and samples == 36  # 12 per class, 3 classes
    assert "engine     staged" in out  # the ResNet adapter's stage chain reproduces the forward
    assert f"trials     at most {a.units.num_units} (one per unit; {a.units.num_units} units in" in out
    assert re.search(r"probe      one pass over S \(a batch, scaled\): [\d.]+ m?s", out)
    assert re.search(r"estimate   analysis about [\d.]+ m?s", out)
    # the staged model: a unit's trial re-runs the stages from its first reader, so a layer
    # nearer the input costs at least as much, and none more than a full pass plus scoring
    staged = estimate(a, 1)
    costs = [staged.trial_seconds[layer.name][0] for layer in a.units.layers]  # output side first
    assert all(c <= staged.probe.seconds + 1e-9 for c in costs) and costs[-1] >= costs[0]
    assert sum(n for _, n in staged.trial_seconds.values()) == a.units.num_units
    # with full forwards every trial is one pass: the estimate is (start-up + units) passes
    a.options = a.options.model_copy(update={"engine": "full"})
    full = estimate(a, 1)
    assert full.engine == "full" and all(s == pytest.approx(full.probe.seconds) for s, _ in full.trial_seconds.values())
    assert full.analysis_seconds == pytest.approx((2 + a.units.num_units) * full.probe.seconds)


def test_run_shows_sample_set_and_engine_on_the_console(config, tmp_path, capsys):
    assert main(["prune", str(config), "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"analysis: \d+ units in \d+ layers, \|S\| = 36 samples, staged engine", err)
    assert main(["prune", str(config), "--out", str(tmp_path / "q"), "--quiet"]) == 0
    assert "|S|" not in capsys.readouterr().err  # --quiet: no bar, no line


def test_resumed_analysis_counts_every_segment(trained_cnn):
    """Stopped after 10 decisions and resumed: the state's seconds and passes cover both
    segments (at least the uninterrupted run's passes; the resume recomputes sigma once)."""
    from cswap.api import _tensor_task
    from cswap.build import analysis_for
    from cswap.options import PruningOptions
    from cswap.pruner import progressive_prune

    model, x, y = trained_cnn
    task = _tensor_task("classification", x, y, 12)
    a = analysis_for(model, task, progress=False, options=PruningOptions(verify_units=False))
    states: list[dict] = []

    class Stop(Exception):
        pass

    def stop_after_ten(state):
        states.append(state)
        if len(state["decisions"]) >= 10:
            raise Stop

    whole: list[dict] = []
    plan = progressive_prune(a, 0, checkpoint=whole.append, checkpoint_seconds=0.0)
    with pytest.raises(Stop):
        progressive_prune(a, 0, checkpoint=stop_after_ten, checkpoint_seconds=0.0)
    first = states[-1]
    assert first["passes"] >= 10 and first["analysis_seconds"] > 0
    resumed: list[dict] = []
    again = progressive_prune(a, 0, checkpoint=resumed.append, checkpoint_seconds=0.0, resume=first)
    assert again.steps == plan.steps  # the same analysis
    total, uninterrupted = resumed[-1], whole[-1]
    assert uninterrupted["passes"] <= total["passes"] <= uninterrupted["passes"] + 2
    assert total["analysis_seconds"] >= first["analysis_seconds"]


def test_replayed_units_move_the_bar_but_not_its_rate():
    from cswap.interfaces import Layer, UnitGraph
    from cswap.pruner.progress import Progress

    graph = UnitGraph([Layer("a", 100, 0, [])], {}, (1, 4))
    progress = Progress(graph, enabled=True)
    progress.skip(90)
    assert progress.bar.n == 90 and progress.bar.format_dict["initial"] == 90
    progress.advance(1)
    assert progress.bar.n == 91  # the rate tqdm shows is (91 - 90) / elapsed: the unit tested, not the replays
    progress.close()


def test_the_dry_run_traces_a_large_image_shrunk_where_the_model_takes_it():
    """Issue 23, item 7: units are traced on at most 128 pixels a side (multiples of 32) when
    the model runs on that size; a model tied to its input size is traced at its own."""
    from torch import nn

    from cswap.estimate import shrunk_inputs

    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    big = torch.randn(1, 3, 1024, 2048)
    assert shrunk_inputs(conv, big, 128).shape == (1, 3, 64, 128)
    fixed = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 64 * 96, 2))
    x = torch.randn(1, 3, 64, 96)
    assert shrunk_inputs(fixed, x, 32) is x  # the linear layer needs 64 x 96: traced as it is
    assert shrunk_inputs(conv, x, 128) is x  # already small
