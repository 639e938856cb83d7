"""`cswap prune` end to end from a YAML config, and what bad input does."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

import cswap
from cswap.cli import main
from cswap.errors import ModelError
from cswap.models.cifar_resnet import cifar_resnet8


def run_cli(*args):
    return main([str(a) for a in args])


def test_prune_end_to_end(config, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("prune", config, "--out", out, "--quiet") == 0
    assert sorted(p.name for p in out.iterdir()) == ["class_metrics.png", "config.yaml", "log.txt", "plan.json",
                                                     "pruned.json", "pruned_model.pt", "report.json"]
    assert not (tmp_path / "run.partial").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["params_removed_ratio"] >= 0.3
    assert report["after"]["params"] < report["before"]["params"]
    assert report["after"]["macs"] < report["before"]["macs"]
    assert "latency_ms_batch1" in report["after"] and "accuracy" in report["after"]
    assert report["self_check_max_abs_diff"] < 1e-4
    assert "parameters" in capsys.readouterr().out
    # the pruned model reloads in a fresh process, weights_only, with the reported size
    code = f"import cswap; m = cswap.load_pruned({str(out)!r}); print(sum(p.numel() for p in m.parameters()))"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(fresh.stdout.strip()) == report["after"]["params"]
    # and equals plan.apply for the same target on the same data: the CLI and the API are one replay
    from cswap.build import build_task
    from cswap.config import load_config

    cfg = load_config(config)
    target = cfg.pruning.target
    assert report["recovery"]["methods"] == target.recovery.method == "least_squares"
    assert report["target"] == json.loads((out / "pruned.json").read_text())["target"] == target.model_dump(mode="json")
    reloaded = cswap.load_pruned(out)
    model = cifar_resnet8(width=4, in_channels=1, num_classes=3)
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    replayed = cswap.PruningPlan.load(out / "plan.json").apply(model.eval(), target, data=build_task(cfg.task))
    mine, theirs = replayed.state_dict(), reloaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_dry_run(config, capsys):
    assert run_cli("prune", config, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "resnet" in out and "units" in out and "layer3.0.conv1" in out


@pytest.mark.parametrize("override,needle", [
    ("model.nme=x", "model.nme"),
    ("seed=abc", "seed"),
    ("task.options.sample_per_class=3", "sample_per_class"),
    ("task.name=nope", "available: classification"),
    ("adapter.name=nope", "available:"),
])
def test_bad_config_names_the_field(config, tmp_path, capsys, override, needle):
    out = tmp_path / "run"
    assert run_cli("prune", config, "--set", override, "--out", out) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_too_few_samples_names_class_and_counts(config, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("prune", config, "--set", "task.options.samples_per_class=500", "--out", out, "--quiet") == 2
    err = capsys.readouterr().err
    assert "class 0" in err and "fewer than samples_per_class=500" in err
    assert not out.exists()


def test_nan_weights_are_an_error(config, tmp_path, capsys):
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    state["fc.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "model.pt")
    out = tmp_path / "run"
    assert run_cli("prune", config, "--out", out, "--quiet") == 2
    assert "NaN" in capsys.readouterr().err
    assert not out.exists()


def test_checkpoint_mismatch_and_pickle_are_named(config, tmp_path, capsys):
    torch.save(cifar_resnet8(width=8, in_channels=1, num_classes=3).state_dict(), tmp_path / "model.pt")
    assert run_cli("prune", config, "--out", tmp_path / "r1", "--quiet") == 2
    assert "conv1.weight: checkpoint (8, 1, 3, 3) vs model (4, 1, 3, 3)" in capsys.readouterr().err
    torch.save({"state_dict": cifar_resnet8(width=4, in_channels=1, num_classes=3).state_dict(), "cfg": object()},
               tmp_path / "model.pt")  # needs full pickle
    assert run_cli("prune", config, "--out", tmp_path / "r2", "--quiet") == 2
    assert "allow_pickle" in capsys.readouterr().err


def test_missing_dataset_root(config, tmp_path, capsys):
    assert run_cli("prune", config, "--set", "task.options.root=/nonexistent/data", "--out", tmp_path / "r") == 2
    assert "/nonexistent/data" in capsys.readouterr().err


def test_untraceable_model_names_the_module():
    class Detach(torch.nn.Module):
        def forward(self, x):
            return x.detach()

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), Detach(), torch.nn.Conv2d(4, 4, 3),
                                torch.nn.Flatten(), torch.nn.Linear(64, 3)).eval()
    x, y = torch.randn(30, 1, 8, 8), torch.arange(30) % 3
    with pytest.raises(ModelError, match="module '1' cuts the autograd graph"):
        cswap.analyze(model, (x, y), samples_per_class=10, progress=False)


def test_preset_paper_is_the_published_rule_and_set_wins(config, tmp_path):
    """`--preset paper`: the zero cut, the critical tail by effect alone and no recovery (the
    report has no recovery, the plan no `critical_order`); a `--set` after it still wins."""
    paper, mixed = tmp_path / "paper", tmp_path / "mixed"
    assert run_cli("prune", config, "--out", paper, "--quiet", "--preset", "paper") == 0
    assert run_cli("prune", config, "--out", mixed, "--quiet", "--preset", "paper", "--set", "pruning.recovery=bn") == 0
    a, b = (json.loads((d / "report.json").read_text()) for d in (paper, mixed))
    assert "recovery" not in a and a["intervention"] == "zero"
    assert b["recovery"]["methods"] == "bn"
    assert (paper / "plan.json").read_bytes() == (mixed / "plan.json").read_bytes()  # recovery never changes the plan
    assert "critical_order" not in json.loads((paper / "plan.json").read_text())["meta"]
    options = yaml.safe_load((paper / "config.yaml").read_text())["test"]["options"]
    assert options["effect"] == "relative" and options["neutral"] == "not_significant"  # the published rule


def test_preset_in_the_api_is_the_same_analysis(trained_mlp):
    """`cswap.analyze(..., preset="paper")` is the paper's test and tail order, spelled out."""
    model, x, y = trained_mlp
    by_name = cswap.analyze(model, (x, y), samples_per_class=10, preset="paper", progress=False)
    spelled = cswap.analyze(model, (x, y), samples_per_class=10,
                            test_options={"effect": "relative", "neutral": "not_significant"},
                            critical_order="effect", progress=False)
    default = cswap.analyze(model, (x, y), samples_per_class=10, progress=False)
    assert by_name.to_json() == spelled.to_json() != default.to_json()
