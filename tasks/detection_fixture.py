"""Scenes in COCO's format, a tiny RetinaNet trained on them, and a config: the detection path
end to end in a few minutes (`cswap fixture detection DIR`, then `cswap prune DIR/config.yaml`).

The scenes are `tasks/detection_scenes.py`'s shapes (square, disk, triangle on a noisy 64x64
canvas, 1-3 per image, no data needed), written as COCO writes a data set
(`coco/<split>/*.png`, `coco/annotations/instances_<split>.json`), so the config reads them
exactly as it would read the user's own COCO-format data (`task.options.format: coco`). The
model is `tiny_retinanet` (torchvision's RetinaNet head and FPN on a small CNN, 3 input
channels) trained with torchvision's own losses for `TRAIN_STEPS` steps, so the analysis sees a
model that detects. Registered as the `detection` fixture (`cswap.fixtures`).
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

SPLITS = {"train": 192, "val": 64}  # scenes per split (seeds as write_coco gives them)
CLASSES = (0, 1, 2)  # square, disk, triangle
# AdamW steps at batch 16, one-cycle learning rate peaking at LR. Measured (one thread, loaded
# machine): mAP@0.5 on the val scenes 0.13 after 150 steps, 0.35 after 300, 0.50 after 500 (about
# 6 min there); at 300 steps lr 6e-3 gave 0.34 and 1e-2 0.06.
TRAIN_STEPS = 500
LR = 3e-3
MODEL = {"source": "cswap", "name": "tiny_retinanet", "kwargs": {"num_classes": len(CLASSES), "in_channels": 3}}


def fixture_config(weights: str = "tiny_retinanet.pt", root: str = "coco") -> dict:
    """The run config of the fixture (paths relative to the config's folder)."""
    return {
        "name": "tiny_retinanet_fixture", "seed": 0, "threads": 1,
        "model": {**MODEL, "weights": weights},
        "task": {"name": "detection", "options": {
            "format": "coco", "root": root, "manifold_split": "train", "eval_split": "val",
            "samples_per_class": 8, "batch_size": 16}},
        "adapter": {"name": "detection"},
        "scorer": {"name": "detection_match"},
        "test": {"name": "paired_t", "options": {"alpha": 0.05, "voting": "per_class"}},
        # measured on this fixture (30 % of the parameters): mAP@0.5 27 % unrepaired, 26 % with bn,
        # 10 % with least_squares (the default): the closed-form repair does not suit this detector
        "pruning": {"params_ratio": 0.3, "recovery": "none"},
        "output": {"dir": "runs", "latency_repeats": 5, "report_batch": 8},
    }


def train_tiny_retinanet(root: Path, steps: int = TRAIN_STEPS) -> torch.nn.Module:
    """`tiny_retinanet` after `steps` seeded AdamW steps on the train split of the COCO folder `root`."""
    from cswap import registry
    from cswap.models.detection import tiny_retinanet
    from cswap.models.detection_training import train_detector

    task = registry.create("tasks", "detection", {"format": "coco", "root": str(root), "manifold_split": "train",
                                                  "eval_split": "val"})
    n = SPLITS["train"]
    torch.manual_seed(0)
    model = tiny_retinanet(**MODEL["kwargs"])
    if steps:
        train_detector(model, task.images("train", range(n)), task.targets("train", range(n), 3), steps=steps,
                       lr=LR, batch_size=16, seed=0)
    return model.eval()


def make_fixture(out: Path, train_steps: int | None = None) -> Path:
    """`out/coco/`, `out/tiny_retinanet.pt` (a state dict) and `out/config.yaml`; returns the
    config's path. `train_steps` None: `TRAIN_STEPS`."""
    from cswap.files import save_state_dict_atomic

    from .detection_scenes import write_coco

    out = Path(out)
    write_coco(out / "coco", SPLITS, classes=CLASSES, source="shapes", size=64, seed=0)
    model = train_tiny_retinanet(out / "coco", TRAIN_STEPS if train_steps is None else train_steps)
    save_state_dict_atomic(model.state_dict(), out / "tiny_retinanet.pt")
    path = out / "config.yaml"
    path.write_text("# The detection fixture of `cswap fixture detection` (shapes on noisy 64x64 scenes in COCO's\n"
                    "# format, a tiny RetinaNet trained on them); relative paths are read against this folder.\n"
                    "# For your own COCO-format data: set task.options.root (and image_size if sizes differ).\n"
                    + yaml.safe_dump(fixture_config(), sort_keys=False))
    return path
