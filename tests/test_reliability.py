"""Crash-safe resume, torchrun sharding and determinism of `cswap prune`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from adapters.cifar_resnet import cifar_resnet8
from cswap.cli import main

REPO = Path(__file__).resolve().parents[1]


def edit(config: Path, **changes) -> Path:
    """Write a copy of the config with dotted keys changed."""
    cfg = yaml.safe_load(config.read_text())
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    out = config.with_name(f"{config.stem}-{'-'.join(sorted(changes))}.yaml")
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.fixture()
def slow_config(config, tmp_path):
    """A run with ~112 units and a state checkpoint after every unit: long enough to kill."""
    torch.manual_seed(0)
    torch.save(cifar_resnet8(width=8, in_channels=1, num_classes=3).state_dict(), tmp_path / "model8.pt")
    return edit(config, model__kwargs={"width": 8, "in_channels": 1, "num_classes": 3},
                model__weights=str(tmp_path / "model8.pt"), threads=1, pruning__params_ratio=None,
                output__checkpoint_seconds=0.0)


def test_sigkill_then_resume_gives_the_uninterrupted_plan(slow_config, tmp_path):
    assert main(["prune", str(slow_config), "--out", str(tmp_path / "whole"), "--quiet"]) == 0
    expected = (tmp_path / "whole" / "plan.json").read_bytes()

    run = tmp_path / "killed"
    state = run.with_name("killed.partial") / "analysis_state.json"
    proc = subprocess.Popen([sys.executable, "-m", "cswap", "prune", str(slow_config), "--out", str(run), "--quiet"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    decided = 0
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            decided = len(json.loads(state.read_text())["decisions"])
            if decided >= 15:
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed ({proc.returncode})"
    assert not run.exists() and 15 <= decided < 112
    assert main(["prune", str(slow_config), "--resume", str(run), "--quiet"]) == 0
    assert (run / "plan.json").read_bytes() == expected
    assert not (run / "analysis_state.json").exists() and not run.with_name("killed.partial").exists()


def test_resume_refuses_a_different_config(slow_config, tmp_path, capsys):
    partial = tmp_path / "r.partial"
    partial.mkdir()
    (partial / "config.yaml").write_text(Path(slow_config).read_text())  # not the resolved form
    assert main(["prune", str(slow_config), "--resume", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "differs from the run being resumed" in err and "---" in err and "+++" in err


def test_same_config_same_plan_bytes(config, tmp_path):
    for name in ("a", "b"):
        assert main(["prune", str(config), "--out", str(tmp_path / name), "--quiet"]) == 0
    assert (tmp_path / "a" / "plan.json").read_bytes() == (tmp_path / "b" / "plan.json").read_bytes()


def test_torchrun_two_processes_give_the_single_process_plan(config, tmp_path):
    # batches of 8 samples: S (36) splits into 5 batches, scored round-robin by the ranks
    cfg = edit(config, task__options={**yaml.safe_load(config.read_text())["task"]["options"], "batch_size": 8},
               threads=1)
    assert main(["prune", str(cfg), "--out", str(tmp_path / "one"), "--quiet"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
         "-m", "cswap", "prune", str(cfg), "--out", str(tmp_path / "two"), "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "two" / "plan.json").read_bytes() == (tmp_path / "one" / "plan.json").read_bytes()
