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

from cswap.cli import main
from cswap.models.cifar_resnet import cifar_resnet8

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
    # the report covers the whole analysis: both segments' passes over S (a replayed decision costs none)
    whole, resumed = (json.loads((d / "report.json").read_text()) for d in (tmp_path / "whole", run))
    assert resumed["analysis_passes"] >= whole["analysis_passes"] > 0


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


# ---- one run per directory, recorded work kept, signals (issue #14, items 2, 3, 6) ---------
def _start(config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cswap", "prune", str(config), *args, "--quiet"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert proc.poll() is None, f"the run ended first ({proc.returncode}): {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def _decisions(partial: Path) -> int:
    try:
        return len(json.loads((partial / "analysis_state.json").read_text())["decisions"])
    except (OSError, ValueError):
        return 0


def test_two_runs_on_one_directory_one_completes_the_other_is_refused(slow_config, tmp_path, capsys):
    run = tmp_path / "cd"
    a = _start(slow_config, "--out", str(run))
    _wait_for(lambda: _decisions(run.with_name("cd.partial")) > 0, a)  # A holds the lock and is analysing
    # B, as in the issue: other options, same --out (in this process, so it starts at once)
    assert main(["prune", str(slow_config), "--out", str(run), "--quiet", "--set", "test.name=paired_t",
                 "--set", "test.options.alpha=0.2", "--set", "task.options.samples_per_class=16"]) == 2
    assert a.poll() is None, "A ended before B was checked"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: run directory {run} is in use by process {a.pid} on {os.uname().nodename} (lock {run}.lock)"]
    _, a_err = a.communicate(timeout=600)
    assert a.returncode == 0, a_err[-2000:]
    # the directory is A's, whole and consistent: config, plan and weights reload together
    assert sorted(p.name for p in run.iterdir()) == ["class_metrics.png", "config.yaml", "log.txt", "plan.json",
                                                     "pruned.json", "pruned_model.pt", "report.json"]
    assert "alpha: 0.2" not in (run / "config.yaml").read_text()
    import cswap

    assert sum(p.numel() for p in cswap.load_pruned(run).parameters()) == \
        json.loads((run / "report.json").read_text())["after"]["params"]
    assert not run.with_name("cd.lock").exists() and not run.with_name("cd.partial").exists()


def test_default_run_names_differ_within_one_second(config):
    from cswap.config import load_config
    from cswap.run import default_run_dir

    cfg = load_config(config)
    assert len({default_run_dir(cfg) for _ in range(20)}) == 20


def _interrupt(config: Path, run: Path, signum: int) -> tuple[subprocess.CompletedProcess, int]:
    """Start a run, let it decide past its first layer, send `signum`; returns the finished
    process and the decisions the state file held just before the signal."""
    partial = run.with_name(run.name + ".partial")
    proc = _start(config, "--out", str(run))
    _wait_for(lambda: _decisions(partial) > 0, proc)
    time.sleep(0.15)  # into the next layer: with checkpoint_seconds 1000 only the force-save records it
    seen = _decisions(partial)
    os.kill(proc.pid, signum)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), seen


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_state_says_how_to_resume_and_resume_completes(slow_config, tmp_path, signum, status):
    # periodic saves only after each layer; S in 36 batches of 1 makes a layer last about a second
    options = {**yaml.safe_load(slow_config.read_text())["task"]["options"], "batch_size": 1}
    lazy = edit(slow_config, output__checkpoint_seconds=1000.0, task__options=options)
    whole = tmp_path / "whole"
    assert main(["prune", str(lazy), "--out", str(whole), "--quiet"]) == 0
    layers = json.loads((whole / "plan.json").read_text())["layers"]
    boundaries = {sum(list(layers.values())[:i]) for i in range(len(layers) + 1)}
    for attempt in range(3):  # a signal right at a layer's end would not show the force-save: try again
        run = tmp_path / f"sig{attempt}"
        partial = run.with_name(run.name + ".partial")
        proc, seen = _interrupt(lazy, run, signum)
        assert proc.returncode == status
        assert proc.stderr.strip().splitlines() == [
            f"interrupted; resume with: cswap prune {lazy} --resume {partial}"]
        assert not run.exists() and partial.is_dir()
        assert f"interrupted by {signal.Signals(signum).name}" in (partial / "log.txt").read_text()
        saved = _decisions(partial)
        assert saved >= seen > 0
        if saved not in boundaries:  # decisions made after the last periodic save were saved on the way out
            break
    else:
        pytest.skip(f"the signal landed at a layer boundary three times ({saved} of {sorted(boundaries)})")
    # a killed writer's temporary must not end up in the completed directory
    (partial / ".pruned_model.pt.abc123.tmp").write_bytes(b"half a file")
    assert main(["prune", str(lazy), "--resume", str(partial), "--quiet"]) == 0
    assert f"{saved} decisions recorded" in (run / "log.txt").read_text()
    assert (run / "plan.json").read_bytes() == (whole / "plan.json").read_bytes()
    assert sorted(p.name for p in run.iterdir()) == ["class_metrics.png", "config.yaml", "log.txt", "plan.json",
                                                     "pruned.json", "pruned_model.pt", "report.json"]


def _resumable(config: Path, run: Path) -> Path:
    """A `.partial` holding recorded decisions, as a killed run leaves it."""
    proc = _start(config, "--out", str(run))
    partial = run.with_name(run.name + ".partial")
    _wait_for(lambda: _decisions(partial) >= 5, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return partial


def test_a_fresh_run_never_discards_recorded_decisions(slow_config, tmp_path, capsys):
    run = tmp_path / "r"
    partial = _resumable(slow_config, run)
    state = (partial / "analysis_state.json").read_bytes()
    assert main(["prune", str(slow_config), "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{partial} holds" in err and "recorded decisions" in err and f"--resume {partial}" in err
    assert "--force" in err and len(err.strip().splitlines()) == 1
    assert (partial / "analysis_state.json").read_bytes() == state and not run.exists()
    # --resume with another --out is refused, not silently ignored
    assert main(["prune", str(slow_config), "--resume", str(partial), "--out", str(tmp_path / "other")]) == 2
    assert "--resume continues" in capsys.readouterr().err and not (tmp_path / "other").exists()
    # --force discards it and starts again
    assert main(["prune", str(slow_config), "--out", str(run), "--quiet", "--force"]) == 0
    assert (run / "report.json").exists() and "resuming" not in (run / "log.txt").read_text()


def test_a_run_killed_before_its_rename_is_renamed_not_redone(config, tmp_path):
    run = tmp_path / "r"
    assert main(["prune", str(config), "--out", str(run), "--quiet"]) == 0
    files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()}
    partial = run.with_name("r.partial")
    os.replace(run, partial)  # as if killed after report.json, just before the rename
    (partial / "analysis_state.json").write_text('{"decisions": []}\n')
    assert main(["prune", str(config), "--resume", str(partial), "--quiet"]) == 0
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()} == files  # nothing rewritten
    assert not partial.exists()
