"""A tiny Cityscapes-layout folder, a DDRNet trained on it, and a config: the segmentation
path end to end in a minute (`cswap fixture cityscapes DIR`, then `cswap prune DIR/config.yaml`).

The frames are synthetic (64x128): sky, building and road bands at random heights, a car on
the road in every other frame, a strip of ignore (255) pixels, colours from the Cityscapes
palette plus noise. Files follow the Cityscapes layout and names
(`leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`,
`gtFine/<split>/<city>/..._gtFine_labelTrainIds.png`), so mmseg's own `CityscapesDataset`
reads them exactly as it reads the real data. The model is mmseg's DDRNet-23-slim code at a
quarter of its width (`TINY`), trained for a few seconds with BatchNorm frozen at its initial
statistics (the wrapper is eval-only), so the analysis sees a model that segments (mIoU about
0.6 on the fixture). The tests use the same generator.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

ROAD, BUILDING, SKY, CAR = 0, 2, 10, 13  # Cityscapes train ids
PALETTE = {ROAD: (128, 64, 128), BUILDING: (70, 70, 70), SKY: (70, 130, 180), CAR: (0, 0, 142)}
DDRNET = "ddrnet_23-slim_in1k-pre_2xb6-120k_cityscapes-1024x1024.py"
# the real mmseg DDRNet code at a quarter of DDRNet-23-slim's width, so a full run takes seconds
TINY = {"model.backbone.channels": 4, "model.backbone.ppm_channels": 8,
        "model.decode_head.in_channels": 16, "model.decode_head.channels": 8}
TRAIN_STEPS = 40  # Adam steps of the fixture's DDRNet: mIoU about 0.6 on the fixture


def write_cityscapes(root: Path, split: str, n: int, seed: int) -> None:
    """`n` frames of `split` under `root` in the Cityscapes layout (module docstring)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        city = ("aachen", "bochum")[i % 2]
        label = np.full((64, 128), ROAD, dtype=np.uint8)
        sky_end, building_end = rng.integers(10, 22), rng.integers(30, 42)
        label[:sky_end], label[sky_end:building_end] = SKY, BUILDING
        if i % 2 == 0:
            x0 = rng.integers(0, 80)
            label[46:58, x0:x0 + rng.integers(20, 40)] = CAR
        label[-2:] = 255
        rgb = np.zeros((64, 128, 3), dtype=np.float64)
        for k, colour in PALETTE.items():
            rgb[label == k] = colour
        rgb = np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype(np.uint8)
        for folder, suffix, array in (("leftImg8bit", "leftImg8bit", rgb), ("gtFine", "gtFine_labelTrainIds", label)):
            path = Path(root) / folder / split / city / f"{city}_{i:06d}_000019_{suffix}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)


def write_folder(root: Path, train: int = 8, val: int = 4) -> Path:
    """The train and val splits of the fixture under `root` (seeds 0 and 1)."""
    write_cityscapes(root, "train", train, seed=0)
    write_cityscapes(root, "val", val, seed=1)
    return Path(root)


def train_tiny_ddrnet(root: Path, steps: int = TRAIN_STEPS) -> torch.nn.Module:
    """The quarter-width DDRNet after `steps` Adam steps on the train split (seeded)."""
    from cswap import registry
    from cswap.models.mmseg import build_mmseg_model

    task = registry.create("tasks", "segmentation", {"root": str(root), "scale": None})
    images, labels = task.load("train", range(len(task.dataset("train"))))
    torch.manual_seed(0)
    model = build_mmseg_model(DDRNET, TINY)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels, ignore_index=255).backward()
        opt.step()
    return model.eval()


def fixture_config(weights: str = "ddrnet_tiny.pth", root: str = "cityscapes") -> dict:
    """The run config of the fixture (paths relative to the config's folder)."""
    return {
        "name": "ddrnet_tiny_fixture", "seed": 0, "threads": 1,
        "model": {"source": "cswap", "name": "mmseg", "kwargs": {"config": DDRNET, "cfg_options": dict(TINY)},
                  "weights": weights},
        "task": {"name": "segmentation", "options": {
            "root": root, "manifold_split": "train", "eval_split": "val", "samples_per_class": 3,
            "min_pixels": 1, "scale": None, "batch_size": 4}},
        "adapter": {"name": "ddrnet"},
        "scorer": {"name": "miou", "options": {"voting": "per_class"}},
        "test": {"name": "paired_t", "options": {"alpha": 0.05, "voting": "per_class", "effect": "absolute"}},
        "pruning": {"params_ratio": 0.3},
        "output": {"dir": "runs", "latency_repeats": 2},
    }


def make_fixture(out: Path, train_steps: int | None = None) -> Path:
    """`out/cityscapes/`, `out/ddrnet_tiny.pth` (an mmseg-style checkpoint: meta and
    state_dict) and `out/config.yaml`; returns the config's path. Registered as the
    `cityscapes` fixture (`cswap fixture cityscapes DIR`, which refuses a folder that is not
    empty); `train_steps` None: `TRAIN_STEPS`."""
    import mmseg

    out = Path(out)
    write_folder(out / "cityscapes")
    model = train_tiny_ddrnet(out / "cityscapes", TRAIN_STEPS if train_steps is None else train_steps)
    torch.save({"meta": {"mmseg_version": mmseg.__version__}, "state_dict": model.state_dict()},
               out / "ddrnet_tiny.pth")
    path = out / "config.yaml"
    path.write_text("# The Cityscapes-layout fixture of `cswap fixture cityscapes` (synthetic frames, a\n"
                    "# quarter-width DDRNet-23-slim trained on them); relative paths are read against this folder.\n"
                    + yaml.safe_dump(fixture_config(), sort_keys=False))
    return path


make_fixture.requires = ("mmseg",)  # read by `cswap list` and `cswap fixture` (the segmentation extra)
