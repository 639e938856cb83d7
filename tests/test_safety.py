"""A config can never make C-SWAP import or run code (issue #14, item 1).

Every injection below writes a marker file if it runs; the tests check that it did not and
that the error names the offending key. The mmseg ones use the real mmseg/mmengine stack.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import cswap
from cswap.cli import main
from cswap.errors import ConfigError, ModelError

REPO = Path(__file__).resolve().parents[1]
DDRNET = "ddrnet_23-slim_in1k-pre_2xb6-120k_cityscapes-1024x1024.py"


@pytest.fixture(scope="module")
def mmseg():
    return pytest.importorskip("mmseg", reason="the segmentation extra is not installed: pip install -e '.[seg]'")


def _mmseg_config(tmp_path: Path, cfg_options: dict, config: str = DDRNET) -> Path:
    cfg = {"model": {"source": "cswap", "name": "mmseg", "kwargs": {"config": config, "cfg_options": cfg_options}},
           "task": {"name": "classification", "options": {"dataset": "tensors", "input_shape": [3, 64, 64]}},
           "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "inject.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_dotted_type_in_cfg_options_runs_nothing(mmseg, tmp_path, capsys):
    marker = tmp_path / "pwned_B"
    # the config: mmengine would import `os.system` and call it with `command`
    path = _mmseg_config(tmp_path, {"model.backbone": {"_delete_": True, "type": "os.system",
                                                       "command": f"touch {marker}"}})
    assert main(["prune", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "cfg_options.model.backbone.type = 'os.system'" in err and "registered" in err
    assert len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("options,needle", [
    ({"custom_imports": {"imports": ["evil"]}}, "cfg_options.custom_imports may not be set"),
    ({"default_scope": "evil"}, "cfg_options.default_scope may not be set"),
    ({"model.backbone._scope_": "evil"}, "_scope_ may not be set"),
    ({"model.decode_head.type": "mmseg.models.decode_heads.DDRHead"}, "not a type registered"),
    ({"model": {"backbone": {"type": "subprocess.Popen"}}}, "cfg_options.model.backbone.type = 'subprocess.Popen'"),
])
def test_cfg_options_that_change_imports_are_refused(mmseg, tmp_path, capsys, options, needle):
    assert main(["prune", str(_mmseg_config(tmp_path, options)), "--dry-run"]) == 2
    assert needle in capsys.readouterr().err


def test_a_registered_name_looked_up_in_the_wrong_registry_imports_nothing(mmseg, tmp_path, monkeypatch):
    """`LoadImageFromFile` is registered (as a transform), so the static check lets it pass;
    the model registry does not have it, and mmengine would then `import LoadImageFromFile`:
    a module of that name on sys.path would run. The build-time guard refuses instead."""
    from cswap.models.mmseg import build_mmseg_model

    marker = tmp_path / "pwned_C"
    (tmp_path / "LoadImageFromFile.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="'LoadImageFromFile', which is not registered in the registry"):
        build_mmseg_model(DDRNET, {"model.backbone": {"_delete_": True, "type": "LoadImageFromFile"}})
    assert not marker.exists() and "LoadImageFromFile" not in sys.modules


def test_custom_imports_of_a_config_file_are_not_imported(mmseg, tmp_path, monkeypatch):
    """Even a Python config the user trusts (the opt-in) cannot make C-SWAP import a module."""
    from cswap.models.mmseg import build_mmseg_model, resolve_config
    from cswap.trust import trust_python_configs

    marker = tmp_path / "pwned_D"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "my_config.py"
    config.write_text(f"_base_ = [{str(resolve_config(DDRNET))!r}]\ncustom_imports = dict(imports=['evilmod'])\n")
    with trust_python_configs(), pytest.raises(ConfigError, match=r"custom_imports \(\['evilmod'\]\) is not supported"):
        build_mmseg_model(str(config))
    assert not marker.exists() and "evilmod" not in sys.modules


# ---- issue 25: no file a user names or receives runs code ----------------------------------
def _python_config(path: Path, marker: Path) -> Path:
    """An mmseg `.py` config that leaves `marker` behind if it is ever executed."""
    path.write_text(f"open({str(marker)!r}, 'w').write('ran')\nmodel = dict(type='EncoderDecoder')\n")
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("WARNING ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_a_received_run_directory_never_runs_its_python_config(mmseg, config, tmp_path, monkeypatch, capsys):
    """Issue 25, critical 1: a run directory whose config.yaml names an mmseg `.py` inside
    it. Neither `load_pruned` nor `cswap export` executes it (named by path or, from inside
    the folder, by a relative name), and the opt-in cannot be smuggled into the config."""
    run = tmp_path / "run"
    assert main(["prune", str(config), "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    marker = tmp_path / "pwned_G"
    _python_config(run / "mmseg_config.py", marker)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    for name in (str(run / "mmseg_config.py"), "mmseg_config.py"):
        cfg["model"] = {"source": "cswap", "name": "mmseg", "kwargs": {"config": name}}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        monkeypatch.chdir(run if name == "mmseg_config.py" else tmp_path)
        with pytest.raises(ConfigError, match=r"mmseg_config\.py is Python, which runs when it is read.*--trust-py"):
            cswap.load_pruned(run)
        assert main(["export", str(run)]) == 2
        assert "is Python, which runs when it is read" in _one_error_line(capsys)
        assert not marker.exists() and not (run / "pruned_model.onnx").exists()
    cfg["trust_python_config"] = True  # the opt-in is no config field: a received file cannot set it
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="trust_python_config: Extra inputs are not permitted"):
        cswap.load_pruned(run)
    assert not marker.exists()


def test_an_mmseg_yaml_config_is_read_as_data(mmseg, tmp_path, capsys):
    """Issue 25, critical 2: mmengine reads a YAML config with PyYAML's unsafe loader, where
    `!!python/object/apply:os.system` runs; C-SWAP reads it with the safe loader."""
    marker = tmp_path / "pwned_H"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"_base_: [{DDRNET}]\nx: !!python/object/apply:os.system ['touch {marker}']\n")
    path = _mmseg_config(tmp_path, {}, config=str(evil))
    assert main(["prune", str(path), "--dry-run"]) == 2
    line = _one_error_line(capsys)
    assert f"cannot read mmseg config {evil}" in line and "python/object/apply:os.system" in line
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_a_python_config_runs_only_under_the_users_opt_in(mmseg, tmp_path, capsys):
    """A `.py` config of the user's own is refused by default (nothing executed); with
    `--trust-python-config` (or `trust_python_configs()`) mmengine reads it, so it runs."""
    from cswap.models.mmseg import build_mmseg_model, resolve_config
    from cswap.models.mmseg_config import is_shipped
    from cswap.trust import python_configs_trusted, trust_python_configs

    marker = tmp_path / "ran"
    mine = _python_config(tmp_path / "mine.py", marker)
    path = _mmseg_config(tmp_path, {}, config=str(mine))
    assert main(["prune", str(path), "--dry-run"]) == 2
    assert "is Python, which runs when it is read" in _one_error_line(capsys) and not marker.exists()
    # opted in: mmengine executes it (the marker appears), then its missing backbone is one line
    assert main(["prune", str(path), "--dry-run", "--trust-python-config"]) == 2
    assert "model.backbone is None" in _one_error_line(capsys) and marker.exists()
    assert not python_configs_trusted()  # the opt-in ended with the command
    marker.unlink()
    with trust_python_configs(), pytest.raises(ConfigError, match="model.backbone is None"):
        build_mmseg_model(str(mine))
    assert marker.exists() and not python_configs_trusted()
    # mmseg's own shipped configs are installed code: read without the flag, also through a link
    shipped = resolve_config(DDRNET)
    link = tmp_path / "link.py"
    link.symlink_to(shipped)
    assert is_shipped(shipped) and is_shipped(link) and not is_shipped(mine)


def test_load_pruned_runs_nothing_a_run_directory_smuggles_in(mmseg, config, tmp_path):
    out = tmp_path / "run"
    assert main(["prune", str(config), "--out", str(out), "--quiet"]) == 0
    original = (out / "config.yaml").read_text()
    marker = tmp_path / "pwned_E"
    # an edited config.yaml with the injection: refused before anything is built
    cfg = yaml.safe_load(original)
    cfg["model"] = {"source": "cswap", "name": "mmseg", "kwargs": {"config": DDRNET, "cfg_options": {
        "model.backbone": {"_delete_": True, "type": "os.system", "command": f"touch {marker}"}}}}
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="os.system"):
        cswap.load_pruned(out)
    assert not marker.exists()

    # allow_pickle smuggled into config.yaml and a pickle that runs code as the weights
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    cfg = yaml.safe_load(original)
    cfg["model"]["allow_pickle"] = True
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    (out / "pruned_model.pt").write_bytes(pickle.dumps({"fc.weight": Payload()}))
    with pytest.raises(ModelError, match="needs full pickle"):
        cswap.load_pruned(out)
    assert not marker.exists()


def test_timm_hub_names_and_weight_arguments_are_refused(config, capsys):
    for override, needle in (("model.name=hf-hub:timm/resnet18.a1_in1k", "hf-hub:"),
                             ("model.kwargs={checkpoint_path: /tmp/x.pth}", "checkpoint_path")):
        assert main(["prune", str(config), "--set", "model.source=timm", "--set", override, "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert needle in err and "downloads nothing" in err


def _dist_info(folder: Path, name: str, entry_points: str) -> None:
    info = folder / f"{name}-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 9.9\n")
    (info / "entry_points.txt").write_text(entry_points)


def _cswap_in(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cswap", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_a_dist_info_in_the_current_directory_cannot_replace_a_builtin(config, tmp_path):
    marker = tmp_path / "pwned_F"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Task: pass\n")
    # a third-party name, and a fake `cswap` distribution: both claim the built-in task
    _dist_info(tmp_path, "evil_plugin", "[cswap.tasks]\nclassification = evilmod:Task\n")
    _dist_info(tmp_path, "cswap", "[cswap.tasks]\nclassification = evilmod:Task\n")
    listing = _cswap_in(tmp_path, "list")
    assert listing.returncode == 0, listing.stderr
    assert "tasks.classification:ClassificationTask" in listing.stdout and "evilmod" not in listing.stdout
    run = _cswap_in(tmp_path, "prune", str(config), "--dry-run")
    assert run.returncode == 0, run.stderr
    assert not marker.exists()


def test_two_distributions_clashing_on_a_name_is_an_error_naming_both(config, tmp_path):
    _dist_info(tmp_path, "plugin_a", "[cswap.scorers]\ndup = amod:Score\n")
    _dist_info(tmp_path, "plugin_b", "[cswap.scorers]\ndup = bmod:Score\n")
    cfg = yaml.safe_load(config.read_text())
    cfg["scorer"] = {"name": "dup"}
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = _cswap_in(tmp_path, "prune", str(path), "--dry-run")
    assert run.returncode == 2
    err = run.stderr.strip().splitlines()
    assert len(err) == 1 and "plugin_a 9.9" in err[0] and "plugin_b 9.9" in err[0] and "'dup'" in err[0]
    assert "CLASH" in _cswap_in(tmp_path, "list").stdout


def test_run_files_get_the_umask_permissions(config, tmp_path):
    out = tmp_path / "run"
    old = os.umask(0o027)
    try:
        assert main(["prune", str(config), "--out", str(out), "--quiet"]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o640}, modes  # mkstemp alone would leave 0600
    assert json.loads((out / "report.json").read_text())["steps_applied"] > 0


# ---- issue 25: nothing that is not provably ours is deleted or overwritten -----------------
def _tree(root: Path) -> dict:
    """Every path under `root` with its bytes (files) or link target: a snapshot to compare."""
    return {p: (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*")) if "__pycache__" not in p.parts}


def test_a_partial_folder_of_the_users_is_never_deleted(config, tmp_path, capsys):
    """Issue 25, critical 3: `--out fs/res2` while `fs/res2.partial/` holds the user's files."""
    fs = tmp_path / "fs"
    (fs / "res2.partial" / "notes").mkdir(parents=True)
    (fs / "res2.partial" / "notes" / "thesis.txt").write_text("three years of work")
    (fs / "res2.partial" / "config.yaml").write_text("looks like ours, is not\n")
    before = _tree(fs)
    for extra in ([], ["--force"]):
        assert main(["prune", str(config), "--out", str(fs / "res2"), "--quiet", *extra]) == 2
        line = _one_error_line(capsys)
        assert f"{fs / 'res2.partial'} exists and is not a run directory C-SWAP created" in line
        assert _tree(fs) == before
    # a .partial of ours (our marker) without recorded work is still cleared for a new run
    from cswap.rundir import MARKER, MARKER_FORMAT

    ours = tmp_path / "ours.partial"
    ours.mkdir()
    (ours / MARKER).write_text(MARKER_FORMAT + "\n")
    (ours / "stale.txt").write_text("x")
    assert main(["prune", str(config), "--out", str(tmp_path / "ours"), "--quiet"]) == 0
    assert not ours.exists() and not (tmp_path / "ours" / "stale.txt").exists()
    assert not (tmp_path / "ours" / MARKER).exists()  # a finished run directory carries no marker


def test_out_paths_that_name_no_new_folder_are_refused_up_front(config, tmp_path, monkeypatch, capsys):
    """`--out .`, `--out /`, a symbolic link to an empty folder, and a `.lock` that is a
    user's file or a link: one line, exit 2, before any analysis, nothing touched."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "link").symlink_to(empty)
    (tmp_path / "taken.lock").write_text("my shopping list\n")
    (tmp_path / "victim.txt").write_text("keep me\n")
    (tmp_path / "linked.lock").symlink_to(tmp_path / "victim.txt")
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    for out, needle in ((".", "--out '.' does not name a new folder"), ("/", "--out '/' does not name a new folder"),
                        (str(tmp_path / "link"), "link is a symbolic link"),
                        (str(tmp_path / "linked"), "linked.lock is a symbolic link"),
                        (str(tmp_path / "taken"), "taken.lock exists and is not a C-SWAP lock file")):
        assert main(["prune", str(config), "--out", out, "--quiet"]) == 2, out
        assert needle in _one_error_line(capsys)
        assert _tree(tmp_path) == before


def test_a_lock_left_by_a_killed_run_is_ours_and_reused(config, tmp_path):
    (tmp_path / "r.lock").write_text("process 12345 on somehost\n")  # SIGKILL leaves it behind
    assert main(["prune", str(config), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert not (tmp_path / "r.lock").exists() and (tmp_path / "r" / "report.json").exists()


def test_only_our_unfinished_partial_without_recorded_work_is_discarded(tmp_path):
    """`rundir.discard_unfinished`, for a run that failed after creating its `.partial`."""
    from cswap.rundir import MARKER, MARKER_FORMAT, STATE_FILE, discard_unfinished

    def partial(name: str, ours: bool, decisions: int) -> Path:
        folder = tmp_path / f"{name}.partial"
        folder.mkdir()
        if ours:
            (folder / MARKER).write_text(MARKER_FORMAT + "\n")
        (folder / STATE_FILE).write_text(json.dumps({"decisions": [{"unit": "conv1:0", "category": "untested"}] *
                                                     decisions}))
        return folder

    fresh, worked, users = partial("fresh", True, 0), partial("worked", True, 3), partial("users", False, 0)
    forged = partial("forged", False, 0)
    (forged / MARKER).write_text("something else\n")
    assert discard_unfinished(fresh) and not fresh.exists()
    assert not discard_unfinished(worked) and (worked / STATE_FILE).exists()  # resumable: kept
    assert not discard_unfinished(users) and (users / STATE_FILE).exists()  # not ours: kept
    assert not discard_unfinished(forged) and (forged / MARKER).exists()  # a marker of another format: kept
