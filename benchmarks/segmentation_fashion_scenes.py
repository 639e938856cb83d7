"""Fig. 7 / Table 5 analog on real images: DDRNet (mmseg) on Fashion-MNIST scenes.

No Cityscapes can be downloaded here, so this composes a segmentation dataset from real
images: each scene is a canvas with several Fashion-MNIST items (Debian package
`dataset-fashion-mnist`) at random places, labelled per pixel with the item's class
(train ids 0-9) where the item is visible and "background" (train id 10) elsewhere. Scenes
are written in the Cityscapes layout, so the run goes through the real path: mmseg's
CityscapesDataset, the `segmentation` task, the `miou` scorer and `cswap curve`.

Steps: compose scenes -> train DDRNet from the mmseg DDRNet-23-slim config (optionally
narrower, `--width`) on CPU for `--steps` steps -> `cswap curve` with C-SWAP, random,
magnitude and AMP (metric mean_sigma, since AMP's KL needs per-image logits) -> CSV, JSON,
PNG and SAUCE table in `--out`.

    python benchmarks/segmentation_fashion_scenes.py --out docs/results/seg_fashion_scenes
The defaults are a short CPU version; the paper-like setting is `--width 32 --steps 2000
--train 2000 --samples-per-class 16 --seeds 3` on a GPU (`--device cuda`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
BACKGROUND = 10
DDRNET = "ddrnet_23-slim_in1k-pre_2xb6-120k_cityscapes-1024x1024.py"


def compose_scenes(root: Path, split: str, n: int, images: np.ndarray, labels: np.ndarray,
                   size=(64, 128), items: int = 3, seed: int = 0) -> None:
    """n scenes of `items` Fashion-MNIST items on a noisy grey background, Cityscapes layout."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    for i in range(n):
        canvas = rng.normal(60, 15, size).clip(0, 255)
        label = np.full(size, BACKGROUND, dtype=np.uint8)
        for j in rng.choice(len(images), items, replace=False):
            y, x = rng.integers(0, h - 28), rng.integers(0, w - 28)
            item = images[j].astype(np.float64)
            visible = item > 40
            canvas[y:y + 28, x:x + 28][visible] = item[visible]
            label[y:y + 28, x:x + 28][visible] = labels[j]
        rgb = np.repeat(canvas[..., None], 3, axis=2).astype(np.uint8)
        city = "fashion"
        for folder, suffix, array in (("leftImg8bit", "leftImg8bit", rgb), ("gtFine", "gtFine_labelTrainIds", label)):
            path = root / folder / split / city / f"{city}_{i:06d}_000019_{suffix}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)


def train(model, task, steps: int, batch: int, lr: float, seed: int) -> list[float]:
    """Adam on cross-entropy; BatchNorm layers learn their statistics (the wrapper itself
    stays in eval mode, which is what makes DDRNet return its main output only)."""
    g = np.random.default_rng(seed)
    n = len(task.dataset("train"))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train()
    losses = []
    for step in range(steps):
        x, y = task.load("train", np.sort(g.choice(n, batch, replace=False)))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y, ignore_index=255)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/results/seg_fashion_scenes"))
    p.add_argument("--width", type=int, default=8, help="DDRNet base channels (32 = DDRNet-23-slim)")
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--val", type=int, default=32)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--samples-per-class", type=int, default=4)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--ratios", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8")
    p.add_argument("--criteria", default="cswap,random,magnitude,amp")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from cswap import registry
    from cswap.cli import main as cswap_main
    from tasks.idx_files import load_mnist_split
    from tasks.mmseg_model import build_mmseg_model

    out = args.out.resolve()
    data = out / "data"
    started = time.perf_counter()
    if not (data / "gtFine").is_dir():
        imgs, labs = load_mnist_split(FASHION_ROOT, "train")
        compose_scenes(data, "train", args.train, imgs[:50000], labs[:50000], seed=0)
        compose_scenes(data, "val", args.val, imgs[50000:], labs[50000:], seed=1)  # items unseen in training

    w = args.width
    cfg_options = {"model.backbone.channels": w, "model.backbone.ppm_channels": 4 * w,
                   "model.decode_head.in_channels": 4 * w, "model.decode_head.channels": 2 * w}
    task_options = {"root": str(data), "samples_per_class": args.samples_per_class, "scale": None,
                    "min_pixels": 16, "batch_size": 16}
    task = registry.create("tasks", "segmentation", task_options)
    model = build_mmseg_model(DDRNET, cfg_options)
    t0 = time.perf_counter()
    losses = train(model, task, args.steps, args.batch, 2e-3, seed=0)
    train_seconds = time.perf_counter() - t0
    weights = out / "ddrnet_fashion_scenes.pt"
    torch.save(model.state_dict(), weights)
    trained = task.evaluate(model)

    cfg = {
        "name": "ddrnet_fashion_scenes", "seed": 0, "device": args.device,
        "model": {"source": "cswap", "name": "mmseg", "kwargs": {"config": DDRNET, "cfg_options": cfg_options},
                  "weights": str(weights)},
        "task": {"name": "segmentation", "options": task_options},
        "adapter": {"name": "ddrnet"},
        "scorer": {"name": "miou", "options": {"voting": "per_class"}},
        "test": {"name": "paired_t", "options": {"alpha": 0.05, "voting": "per_class"}},
        "output": {"dir": str(out), "latency_repeats": 3},
    }
    cfg_path = out / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc = cswap_main(["curve", str(cfg_path), "--criteria", args.criteria, "--seeds", str(args.seeds),
                     "--ratios", args.ratios, "--criterion-options", json.dumps({"amp": {"metric": "mean_sigma"}}),
                     "--out", str(out / "curve"), "--quiet"])
    (out / "setup.json").write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()}, "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 1), "final_loss": float(np.mean(losses[-10:])),
        "trained_eval": trained, "total_seconds": round(time.perf_counter() - started, 1), "curve_rc": rc,
    }, indent=1) + "\n")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
