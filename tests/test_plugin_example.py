"""The example plugin package installs on its own and is used by `cswap` unchanged."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "cswap-plugin-example"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "example"
    shutil.copytree(EXAMPLE, source)  # building writes egg-info next to the sources: not in the repo
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, text=True)
    return target


def _env(target: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}


def test_cswap_list_shows_the_example(installed):
    out = subprocess.run([sys.executable, "-m", "cswap", "list"], env=_env(installed),
                         capture_output=True, text=True, check=True).stdout
    for name in ("tempered_probability", "tiny_vgg"):
        line = next(l for l in out.splitlines() if l.strip().startswith(name))
        assert "[cswap-plugin-example]" in line


def test_a_run_uses_the_example_plugins(installed, tmp_path, npz_dataset):
    sys.path.insert(0, str(installed))
    try:
        from cswap_plugin_example.vgg import tiny_vgg

        torch.manual_seed(0)
        torch.save(tiny_vgg(in_channels=1, num_classes=3).state_dict(), tmp_path / "vgg.pt")
    finally:
        sys.path.remove(str(installed))
    cfg = {
        "name": "plugin", "seed": 0,
        "model": {"source": "cswap", "name": "tiny_vgg", "kwargs": {"in_channels": 1, "num_classes": 3},
                  "weights": str(tmp_path / "vgg.pt")},
        "task": {"name": "classification", "options": {"dataset": "npz", "root": str(npz_dataset),
                 "manifold_split": "manifold", "eval_split": "eval", "samples_per_class": 12}},
        "scorer": {"name": "tempered_probability", "options": {"temperature": 3.0}},
        "pruning": {"params_ratio": 0.2, "engine": "staged"},
        "output": {"latency_repeats": 2},
    }
    (tmp_path / "plugin.yaml").write_text(yaml.safe_dump(cfg))
    run = subprocess.run([sys.executable, "-m", "cswap", "prune", str(tmp_path / "plugin.yaml"),
                          "--out", str(tmp_path / "run"), "--quiet"],
                         env=_env(installed), capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["adapter"] == "tiny_vgg" and report["params_removed_ratio"] >= 0.2
    assert (tmp_path / "run" / "config.yaml").read_text().count("tempered_probability") == 1
