"""`cswap curve` and `cswap sweep` end to end on a tiny npz dataset and a briefly trained ResNet-8."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from cswap.cli import main  # noqa: E402
from cswap.curves import parse_criteria, parse_ratios  # noqa: E402
from cswap.errors import ConfigError  # noqa: E402
from cswap.plan import PruningPlan  # noqa: E402
from cswap.sauce import sauce  # noqa: E402

from helpers_tiny import CLASSES, blob_data, tiny_resnet  # noqa: E402


def _uint8(x: torch.Tensor) -> np.ndarray:
    return (x.squeeze(1).clamp(-2.5, 2.5) * 50 + 128).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("curve")
    (xtr, ytr), (xte, yte) = blob_data((1, 28, 28), 48, 0), blob_data((1, 28, 28), 48, 1)
    np.savez(root / "data.npz", train_images=_uint8(xtr), train_labels=ytr.numpy(),
             test_images=_uint8(xte), test_labels=yte.numpy())
    model = tiny_resnet()
    x = torch.from_numpy(_uint8(xtr)).float().div(255).unsqueeze(1)  # what the task will feed
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(25):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), ytr).backward()
        opt.step()
    with torch.no_grad():  # exact BatchNorm statistics: 25 steps of momentum 0.1 are not enough
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        model(x)
    torch.save(model.eval().state_dict(), root / "model.pt")
    cfg = {
        "name": "tiny", "seed": 3,
        "model": {"source": "cswap", "name": "cifar_resnet8",
                  "kwargs": {"width": 8, "in_channels": 1, "num_classes": CLASSES}, "weights": str(root / "model.pt")},
        "task": {"name": "classification", "options": {"dataset": "npz", "root": str(root / "data.npz"),
                                                         "samples_per_class": 3}},
        "test": {"name": "paired_t", "options": {"alpha": 0.05}},
        "output": {"dir": str(root / "runs")},
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root / "cfg.yaml"


def _read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_curve_cli_writes_every_output_and_consistent_numbers(config, tmp_path, capsys):
    out = tmp_path / "curve"
    rc = main(["curve", str(config), "--criteria", "random,magnitude,magnitude/layer,cbp", "--seeds", "2",
               "--ratios", "0,0.2,0.5,0.95", "--out", str(out), "--quiet"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= {"curve.csv", "curve.json", "sauce.md", "curve.png", "plans"}
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _read_csv(out / "curve.csv")
    report = json.loads((out / "curve.json").read_text())
    unpruned = report["unpruned"]
    assert 0.9 < unpruned <= 1.0  # the briefly trained model learned the blobs
    assert report["seeds"] == [3, 4]
    sauces = {}
    for label in ("random", "magnitude", "magnitude/layer", "cbp"):
        for seed in (3, 4):
            mine = [r for r in rows if r["criterion"] == label and int(r["seed"]) == seed]
            x = [float(r["params_ratio"]) for r in mine]
            y = [100 * float(r["accuracy"]) for r in mine]
            assert float(mine[0]["target_ratio"]) == 0 and x[0] == 0 and y[0] == pytest.approx(100 * unpruned)
            assert x == sorted(x)
            assert [float(r["target_ratio"]) for r in mine] == [0, 0.2, 0.5, 0.95]
            plan = PruningPlan.load(out / "plans" / f"{label.replace('/', '-')}-seed{seed}.json")
            removed = plan.cumulative_params_removed()
            for r in mine:  # the fewest steps that meet the target, exactly as counted
                k = int(r["steps"])
                assert float(r["params_ratio"]) == pytest.approx(removed[k] / plan.params_total)
                assert float(r["params_ratio"]) >= float(r["target_ratio"])
                assert k == 0 or removed[k - 1] / plan.params_total < float(r["target_ratio"])
            sauces[label, seed] = sauce(x, y)
    for a in report["analyses"]:
        assert a["sauce"] == pytest.approx(sauces[a["criterion"], a["seed"]])
    table = {r["criterion"]: r for r in report["sauce"]}
    # OMP's plan does not depend on the seed; its curve does, through the seed's S the default
    # least-squares recovery calibrates on
    steps = [json.loads((out / "plans" / f"magnitude-seed{seed}.json").read_text())["steps"] for seed in (3, 4)]
    assert steps[0] and steps[0] == steps[1]
    assert sauces["random", 3] != sauces["random", 4]
    md = (out / "sauce.md").read_text()
    for label in ("random", "magnitude", "magnitude/layer", "cbp"):
        assert f"| {label} | {table[label]['sauce_mean']:.1f} ± {table[label]['sauce_std']:.1f} |" in md
    assert "SAUCE" in capsys.readouterr().out


def test_sweep_cli_reports_every_setting(config, tmp_path):
    out = tmp_path / "sweep"
    rc = main(["sweep", str(config), "--alpha", "0.05,0.2", "--test-option", "voting=per_class,pooled",
               "--samples-per-class", "2,3", "--ratios", "0,0.5", "--out", str(out), "--quiet"])
    assert rc == 0
    rows = _read_csv(out / "sweep.csv")
    assert len(rows) == 8
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    total_units = 112
    for r in rows:
        counts = int(r["neutral"]) + int(r["detrimental"]) + int(r["critical"])
        assert counts <= total_units
        assert int(r["noncritical_units"]) == int(r["neutral"]) + int(r["detrimental"])
        assert 0 <= float(r["noncritical_params_ratio"]) < 1
        assert 0 < float(r["sauce"]) <= 100
    md = (out / "sweep.md").read_text()
    assert md.count("\n| 0.") == 8  # one table row per setting


def test_replay_stops_where_the_plan_cannot_shrink_further():
    from cswap import registry
    from cswap.build import analysis_for
    from cswap.curves import replay_curve
    from cswap.options import Target
    from cswap.plan import PruningPlan
    from cswap.replay import ReplayData, replay_steps

    from helpers_tiny import tensor_task

    model, task = tiny_resnet(), tensor_task((1, 28, 28), samples_per_class=2, n=16)
    analysis = analysis_for(model, task)
    graph = analysis.units
    plan = PruningPlan.from_ranking(model, graph, registry.create("criteria", "magnitude").rank(analysis, 0),
                                    adapter=analysis.adapter_name)
    plan.steps = plan.steps[: len(plan.steps) // 3]  # a plan that can remove only part of the model
    reachable = plan.cumulative_params_removed()[-1] / plan.params_total
    assert 0.05 < reachable < 0.9
    unpruned = task.evaluate(model)["accuracy"]
    plain = Target(recovery="none")
    rows = replay_curve(model, plan, task, (0, 0.05, 0.9, 0.95), analysis.adapter, "accuracy", unpruned,
                        target=plain, data=ReplayData())
    assert [r["target_ratio"] for r in rows] == [0, 0.05, pytest.approx(reachable)]
    assert rows[-1]["steps"] == len(plan.steps) and rows[-1]["params_ratio"] == pytest.approx(reachable)
    assert rows[0]["accuracy"] == unpruned
    whole = replay_steps(plan, model, len(plan.steps), plain, ReplayData(), adapter=analysis.adapter).model
    assert rows[-1]["accuracy"] == task.evaluate(whole)["accuracy"]


def test_parsers_reject_bad_input():
    assert parse_ratios("0.5,0.1") == (0.0, 0.1, 0.5)
    with pytest.raises(ConfigError):
        parse_ratios("0,1.0")
    with pytest.raises(ConfigError, match="unknown criterion"):
        parse_criteria("magnitude,nonsense")
    with pytest.raises(ConfigError, match="NAME/layer"):
        parse_criteria("magnitude/global")
    specs = parse_criteria("amp,magnitude/layer", {"amp": {"tau": 0.5}})
    assert specs[0].options == {"tau": 0.5} and specs[1].options == {"normalize": "layer"}


def test_curve_cli_reports_a_bad_criterion_without_traceback(config, tmp_path, capsys):
    rc = main(["curve", str(config), "--criteria", "magnitude,nonsense", "--out", str(tmp_path / "x"), "--quiet"])
    assert rc == 2
    assert "unknown criterion 'nonsense'" in capsys.readouterr().err


def test_curve_with_latency_measures_every_point_and_plots_accuracy_vs_speedup(config, tmp_path):
    """`cswap curve --latency`: every replayed point carries its measured speed-up (the
    unpruned point exactly 1), and a second plot puts accuracy against it."""
    out = tmp_path / "curve"
    assert main(["curve", str(config), "--criteria", "magnitude", "--seeds", "1", "--ratios", "0,0.5",
                 "--out", str(out), "--quiet", "--latency"]) == 0
    assert (out / "curve_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _read_csv(out / "curve.csv")
    assert [float(r["target_ratio"]) for r in rows][:2] == [0.0, 0.5]
    assert float(rows[0]["speedup"]) == 1.0 and all(float(r["speedup"]) > 0 for r in rows)
