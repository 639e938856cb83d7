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
    from cswap.models.mmseg import build_mmseg_model, resolve_config

    marker = tmp_path / "pwned_D"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "my_config.py"
    config.write_text(f"_base_ = [{str(resolve_config(DDRNET))!r}]\ncustom_imports = dict(imports=['evilmod'])\n")
    with pytest.raises(ConfigError, match=r"custom_imports \(\['evilmod'\]\) is not supported"):
        build_mmseg_model(str(config))
    assert not marker.exists() and "evilmod" not in sys.modules


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
