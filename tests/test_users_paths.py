"""What a new user meets first: packaged configs that run from any folder, `--version`,
`prune --help` with examples, and the console saying what is wrong (random weights,
channels-last images) instead of failing far from the cause."""
from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml

import cswap
from cswap.cli import main
from cswap.errors import ModelError
from cswap.packaged import packaged_configs


def test_config_lists_the_packaged_configs(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines()]
    assert names[0] == "demo" and {"ddrnet23s_cityscapes", "resnet18_cifar10"} <= set(names)
    assert set(names) == set(packaged_configs())
    assert "The embedded demo" in out  # each with its one-line description


def test_printed_demo_config_runs_from_another_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no checkout here: the shipped data and checkpoint are named absolutely
    assert main(["config", "demo"]) == 0
    text = capsys.readouterr().out
    cfg = yaml.safe_load(text)
    for path in (cfg["model"]["weights"], cfg["task"]["options"]["root"]):
        assert Path(path).is_absolute() and Path(path).is_file()
    (tmp_path / "my.yaml").write_text(text)
    assert main(["prune", "my.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"weights from {cfg['model']['weights']}" in out.splitlines()[0] and "random" not in out
    # the packaged name runs in place too
    assert main(["prune", "demo", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == out.splitlines()[0]


def test_unknown_packaged_config_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "demoo"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no packaged config 'demoo'" in err and "demo" in err


def test_version_and_prune_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"cswap {version('cswap')}"
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = capsys.readouterr().out
    assert "cswap config demo > my.yaml && cswap prune my.yaml" in out and "--resume" in out
    assert "packaged config" in " ".join(out.split())  # the config argument explained (wrapping follows the terminal)


def test_random_weights_are_a_console_warning(config, capsys):
    data = yaml.safe_load(config.read_text())
    del data["model"]["weights"]
    config.write_text(yaml.safe_dump(data))
    assert main(["prune", str(config), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "WARNING model cswap:cifar_resnet8 has random weights (random initialisation (no weights given))" in err
    assert "model.weights" in err


def test_channels_last_images_are_named():
    from conftest import patterns, small_cnn

    x, y = patterns(10)  # (N, 1, 8, 8) for a model whose first convolution reads 1 channel
    model = small_cnn().eval()
    nhwc = x.permute(0, 2, 3, 1)
    with pytest.raises(ModelError, match=r"channels last \(N, H, W, C\).*reads 1 channels on dim 1.*permute\(0, 3, 1, 2\)"):
        cswap.analyze(model, (nhwc, y), samples_per_class=4, progress=False)
    assert torch.equal(nhwc.permute(0, 3, 1, 2), x)  # the fix the message gives


@pytest.mark.slow
def test_installed_copy_runs_a_packaged_config_outside_the_checkout(tmp_path):
    """A non-editable install into a fresh venv, used from a folder that is not the clone:
    the configs are listed, the demo's copy runs (about 40 s: the install and one run)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(repo)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def cswap(*args):
        return subprocess.run([str(venv / "bin" / "cswap"), *args], cwd=elsewhere, capture_output=True, text=True,
                              check=True).stdout

    assert "ddrnet23s_cityscapes" in cswap("config")
    text = cswap("config", "demo")
    assert str(venv) in text and str(repo) not in text  # the installed copy's shipped files
    (elsewhere / "my.yaml").write_text(text)
    cswap("prune", "my.yaml", "--out", "r", "--quiet")
    assert json.loads((elsewhere / "r" / "report.json").read_text())["after"]["params"] > 0
