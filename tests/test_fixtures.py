"""`cswap fixture KIND DIR`: writers found through the `cswap.fixtures` entry points, a folder
of the user's never overwritten without --force (issue 25), and the detection fixture's
COCO-format scenes, detector and config (issue 28)."""
from __future__ import annotations

import json

import pytest

from cswap import registry
from cswap.cli import main


def test_fixtures_are_plugins_and_the_cli_imports_none():
    from pathlib import Path

    import cswap.cli

    assert {"cityscapes", "detection"} <= set(registry.available("fixtures"))
    source = Path(cswap.cli.__file__).read_text()
    assert "cityscapes_fixture" not in source and "detection_fixture" not in source


@pytest.mark.parametrize("kind", ["cityscapes", "detection"])
def test_a_folder_that_is_not_empty_is_refused_and_left_alone(kind, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("my own config\n")
    assert main(["fixture", kind, str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not empty" in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
    assert (out / "config.yaml").read_text() == "my own config\n"
    (tmp_path / "file").write_text("x")
    assert main(["fixture", kind, str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_bad_fixture_arguments_are_one_line(tmp_path, capsys):
    assert main(["fixture", "nosuch", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown fixture 'nosuch'" in err and "detection" in err
    assert main(["fixture", "detection", str(tmp_path / "a"), "--train-steps", "-1"]) == 2
    assert "--train-steps must be 0 or more" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_detection_fixture_writes_coco_scenes_a_detector_and_a_config(tmp_path, capsys, one_thread):
    """With a few training steps (seconds): the files, a config that validates and dry-runs,
    and --force writing into the folder again without touching the user's other files."""
    from cswap.config import load_config

    out = tmp_path / "det"
    assert main(["fixture", "detection", str(out), "--train-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "coco/, config.yaml, tiny_retinanet.pt" in printed and f"cswap prune {out / 'config.yaml'}" in printed
    annotations = json.loads((out / "coco" / "annotations" / "instances_val.json").read_text())
    assert len(annotations["images"]) == 64 and {c["name"] for c in annotations["categories"]} == {
        "square", "disk", "triangle"}
    cfg = load_config(out / "config.yaml")
    assert cfg.task.options["format"] == "coco" and cfg.model.weights == (out / "tiny_retinanet.pt").resolve()
    assert main(["prune", str(out / "config.yaml"), "--dry-run"]) == 0
    assert "adapter    detection" in capsys.readouterr().out
    (out / "notes.txt").write_text("mine")
    assert main(["fixture", "detection", str(out), "--train-steps", "0", "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
