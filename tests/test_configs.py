"""The paper-experiment configs validate and dry-run on tiny local fixtures in the real layouts.

`cswap prune CONFIG --dry-run` needs the data root to exist (the task reads one example
input from it); the weights may be absent (random initialisation, reported)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from cswap.config import load_config
from cswap.run import describe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = {
    "resnet18_cifar10": ("resnet", "cswap:resnet18_cifar"),
    "resnet50_imagenet10": ("resnet", "torchvision:resnet50"),
    "mobilenetv2_imagenet10": ("mobilenetv2", "torchvision:mobilenet_v2"),
    "vit_b16_imagenet10": ("vit", "timm:vit_base_patch16_224"),
}


@pytest.fixture()
def imagefolder(tmp_path) -> Path:
    """ImageNet-10 layout: root/<split>/<wnid>/<image>, one small image per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k in range(10):
            folder = tmp_path / "imagenet10" / split / f"n{k:08d}"
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / "0.png")
    return tmp_path / "imagenet10"


@pytest.fixture()
def cifar10(tmp_path, monkeypatch) -> Path:
    """torchvision's CIFAR10 folder with tiny batches; its md5 check is bypassed (real files
    pass it, these cannot)."""
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar10" / CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        batch = {"data": rng.integers(0, 255, (10, 3072), dtype=np.uint8), "labels": list(range(10))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{k}" for k in range(10)]}))
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    return tmp_path / "cifar10"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_config_validates(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    adapter, model = PAPER[name]
    assert cfg.adapter.name == adapter and f"{cfg.model.source}:{cfg.model.name}" == model
    assert cfg.task.options["samples_per_class"] == 128 and cfg.test.options["alpha"] == 0.05
    # relative paths are read against the config's folder (configs/../weights/)
    assert cfg.model.weights == CONFIGS.resolve().parent / "weights" / f"{name}.pt"


@pytest.mark.parametrize("name", ["resnet18_cifar10", "mobilenetv2_imagenet10",
                                  pytest.param("resnet50_imagenet10", marks=pytest.mark.slow),
                                  pytest.param("vit_b16_imagenet10", marks=pytest.mark.slow)])
def test_dry_run(name, request):
    root = request.getfixturevalue("cifar10" if "cifar" in name else "imagefolder")
    cfg = load_config(CONFIGS / f"{name}.yaml", [f"task.options.root={root}"])
    text = describe(cfg)
    assert "random initialisation: weight file" in text
    assert f"adapter    {PAPER[name][0]}" in text
    assert "would run  one forward pass over S per unit" in text


def test_dry_run_needs_neither_weights_nor_data(capsys):
    from cswap.cli import main

    assert main(["prune", str(CONFIGS / "resnet18_cifar10.yaml"), "--dry-run", "--set", "device=cpu",
                 "--set", "task.options.root=/nonexistent/cifar10"]) == 0
    out = capsys.readouterr().out
    assert "is absent" in out and "example input (1, 3, 32, 32)" in out and "2880 in 12 layers" in out


def test_detection_config_validates():
    cfg = load_config(CONFIGS / "retinanet_coco.yaml")
    assert (cfg.adapter.name, cfg.scorer.name, f"{cfg.model.source}:{cfg.model.name}") == (
        "detection", "detection_match", "cswap:torchvision_detector")
    assert cfg.task.options["format"] == "coco" and cfg.task.options["labels"] == "category_id"
    assert cfg.task.options["root"] == str(CONFIGS.resolve().parent / "data" / "coco")  # read against the config


@pytest.mark.slow  # units of a ResNet-50 FPN RetinaNet, each layer checked: minutes on one thread
def test_detection_config_dry_runs_on_coco_layout(tmp_path, one_thread):
    """The COCO 2017 layout with two tiny splits (category ids 1 and 18, so labels: category_id
    keeps gaps), 64x64 instead of 512x512 to keep the check short."""
    import json

    from PIL import Image

    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / split).mkdir()
        Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(root / split / "a.jpg")
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps({
            "images": [{"id": 1, "file_name": "a.jpg", "height": 48, "width": 64}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 18, "bbox": [2, 2, 20, 20]}],
            "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]}))
    cfg = load_config(CONFIGS / "retinanet_coco.yaml", [f"task.options.root={root}", "task.options.image_size=[64,64]"])
    text = describe(cfg)
    assert "random initialisation: weight file" in text and "adapter    detection" in text
