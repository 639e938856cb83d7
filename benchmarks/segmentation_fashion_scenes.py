"""Fig. 7 / Table 5 analog on real images: DDRNet (mmseg) on Fashion-MNIST scenes.

No Cityscapes can be downloaded here, so this composes a segmentation dataset from real
images: each scene is a canvas with several Fashion-MNIST items (Debian package
`dataset-fashion-mnist`) at random places, labelled per pixel with the item's class
(train ids 0-9) where the item is visible and "background" (train id 10) elsewhere. Scenes
are written in the Cityscapes layout, so the run goes through the real path: mmseg's
CityscapesDataset, the `segmentation` task, the `miou` scorer and `cswap curve`.

Steps: compose scenes -> train DDRNet from the mmseg DDRNet-23-slim config (optionally
narrower, `--width`) on CPU for `--steps` steps (AdamW, poly learning-rate decay) ->
`cswap curve` with C-SWAP, random, magnitude and AMP (metric mean_sigma, since AMP's KL needs
per-image logits) -> parameters, MACs, latency and mIoU of the model C-SWAP prunes (all its
non-critical units) beside the original's -> small CSV, JSON, PNG and SAUCE table in `--out`.

Scenes, the trained checkpoint and the curve's plans go to `--work` (default under the
gitignored runs/); a checkpoint of the same settings is reused (loaded with weights_only),
so a second run only redoes the curves.

    OMP_NUM_THREADS=1 python benchmarks/segmentation_fashion_scenes.py --out docs/results/segmentation
The defaults are the CPU setting of docs/results/segmentation.md; the paper-like setting is
`--width 32 --size 512,1024 --samples-per-class 16 --seeds 3` on a GPU (`--device cuda`).

Data: the full Fashion-MNIST, read locally (`apt-get install dataset-fashion-mnist`, or
CSWAP_FASHION_MNIST=DIR; see benchmarks/datasets.py); without it the script stops at once
with that hint.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # tasks, scorers, adapters, criteria: the repository's plugins

from benchmarks.datasets import fashion_mnist_root  # noqa: E402
from cswap.removal import count_params  # noqa: E402

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
    """AdamW on cross-entropy with poly decay (mmseg's schedule, power 0.9); BatchNorm layers
    learn their statistics (the wrapper itself stays in eval mode, which is what makes DDRNet
    return its main output only)."""
    g = np.random.default_rng(seed)
    n = len(task.dataset("train"))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 - s / steps) ** 0.9)
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
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def pruned_costs(model, plans: Path, task, adapter, example) -> list[dict]:
    """Each C-SWAP plan replayed over all its non-critical units (its own stopping point):
    parameters, MACs, latency and mIoU of the pruned model beside the original's."""
    from cswap.metrics import model_costs
    from cswap.options import Target
    from cswap.plan import PruningPlan
    from cswap.replay import removed_model

    rows = [{"model": "original", **model_costs(model, example, batch=16, repeats=20),
             "mIoU": task.evaluate(model)["mIoU"]}]
    for path in sorted(plans.glob("cswap-seed*.json")):
        plan = PruningPlan.load(path)
        k = plan.num_noncritical
        pruned = removed_model(plan, model, k, Target(), adapter)  # these plans replay without recovery
        rows.append({"model": f"cswap {path.stem.split('-')[-1]}: {k} non-critical units removed",
                     "params_removed": plan.cumulative_params_removed()[k] / plan.params_total,
                     **model_costs(pruned, example, batch=16, repeats=20), "mIoU": task.evaluate(pruned)["mIoU"]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/results/segmentation"), help="small results (CSV, JSON, PNG)")
    p.add_argument("--work", type=Path, default=Path("runs/seg_fashion_scenes"),
                   help="scenes, checkpoint, plans (large, not for git)")
    p.add_argument("--width", type=int, default=16, help="DDRNet base channels (32 = DDRNet-23-slim)")
    p.add_argument("--size", default="64,128", help="scene height,width in pixels")
    p.add_argument("--items", type=int, default=3, help="Fashion-MNIST items per scene")
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--samples-per-class", type=int, default=8)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seeds-per-criterion", default="{}", metavar="JSON", help='e.g. \'{"amp": 1}\'')
    p.add_argument("--ratios", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    p.add_argument("--criteria", default="cswap,random,magnitude,amp")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-only", action="store_true", help="stop after training and evaluating the model")
    args = p.parse_args(argv)
    fashion_mnist_root()  # stop now, with the setup hint, on a machine without the data
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from cswap import registry
    from cswap.cli import main as cswap_main
    from cswap.models.mmseg import build_mmseg_model
    from cswap.tasks.idx_files import load_mnist_split

    out, work = args.out.resolve(), args.work.resolve()
    size = tuple(int(v) for v in args.size.split(","))
    data = work / f"data-{size[0]}x{size[1]}-items{args.items}-train{args.train}-val{args.val}"
    started = time.perf_counter()
    if not (data / "gtFine").is_dir():
        imgs, labs = load_mnist_split(fashion_mnist_root(), "train")
        compose_scenes(data, "train", args.train, imgs[:50000], labs[:50000], size, args.items, seed=0)
        compose_scenes(data, "val", args.val, imgs[50000:], labs[50000:], size, args.items, seed=1)  # unseen items

    w = args.width
    cfg_options = {"model.backbone.channels": w, "model.backbone.ppm_channels": 4 * w,
                   "model.decode_head.in_channels": 4 * w, "model.decode_head.channels": 2 * w}
    task_options = {"root": str(data), "samples_per_class": args.samples_per_class, "scale": None,
                    "min_pixels": 16, "batch_size": 16}
    task = registry.create("tasks", "segmentation", task_options)
    model = build_mmseg_model(DDRNET, cfg_options)
    weights = work / f"ddrnet-w{w}-{data.name}-steps{args.steps}-b{args.batch}-lr{args.lr:g}.pt"
    log_path = weights.with_suffix(".json")
    if weights.is_file() and log_path.is_file():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        training = json.loads(log_path.read_text())
    else:
        t0 = time.perf_counter()
        losses = train(model, task, args.steps, args.batch, args.lr, seed=0)
        training = {"train_seconds": round(time.perf_counter() - t0, 1),
                    "loss_every_100": [round(float(np.mean(losses[i:i + 100])), 4) for i in range(0, len(losses), 100)]}
        work.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), weights)
        log_path.write_text(json.dumps(training) + "\n")
    model.eval()
    trained = task.evaluate(model)
    setup = {"args": {k: str(v) for k, v in vars(args).items()}, "params": count_params(model),
             **training, "trained_eval": trained, "checkpoint": str(weights)}
    cfg = {
        "name": "ddrnet_fashion_scenes", "seed": 0, "device": args.device,
        "model": {"source": "cswap", "name": "mmseg", "kwargs": {"config": DDRNET, "cfg_options": cfg_options},
                  "weights": str(weights)},
        "task": {"name": "segmentation", "options": task_options},
        "adapter": {"name": "ddrnet"},
        "scorer": {"name": "miou", "options": {"voting": "per_class"}},
        "test": {"name": "paired_t", "options": {"alpha": 0.05, "voting": "per_class"}},
        "output": {"dir": str(work), "latency_repeats": 3},
    }
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # written before --train-only returns: benchmarks/recovery.py reads the model from it
    out.mkdir(parents=True, exist_ok=True)
    if args.train_only:
        (out / "setup.json").write_text(json.dumps(setup, indent=1) + "\n")
        return 0

    # one `cswap curve` per criterion, so each can have its own number of seeds and a finished
    # criterion is reused when the run is repeated; the parts are merged into one table and plot
    criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    seeds_of = {c: int(json.loads(args.seeds_per_criterion).get(c, args.seeds)) for c in criteria}
    parts, curve_seconds, rc = [], {}, 0
    for c in criteria:
        part = work / f"curve-{c.replace('/', '-')}-seeds{seeds_of[c]}"
        if not (part / "curve.json").is_file():
            t0 = time.perf_counter()
            rc = cswap_main(["curve", str(cfg_path), "--criteria", c, "--seeds", str(seeds_of[c]),
                             "--ratios", args.ratios, "--criterion-options",
                             json.dumps({"amp": {"metric": "mean_sigma"}}), "--out", str(part), "--quiet"])
            if rc != 0:
                break
            (part / "wall_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
        parts.append((c, part, json.loads((part / "curve.json").read_text())))
        curve_seconds[c] = float((part / "wall_seconds.txt").read_text())
    costs = []
    if rc == 0:
        from cswap.reports import CurveResult, write_curve_outputs

        first = parts[0][2]
        result = CurveResult(first["metric"], first["unpruned"], first["params_total"],
                             [r for _, _, d in parts for r in d["rows"]], [a for _, _, d in parts for a in d["analyses"]])
        meta = {"config": cfg["name"], "model": f"mmseg:{DDRNET} width {w}", "ratios": first["ratios"],
                "seeds": {c: d["seeds"] for c, _, d in parts}, "criteria": [d["criteria"][0] for _, _, d in parts]}
        write_curve_outputs(result, out, f"DDRNet (width {w}) on Fashion-MNIST scenes", meta)
        if "cswap" in criteria:
            from cswap.build import resolve_adapter

            _, adapter = resolve_adapter("ddrnet", model)
            plans = next(part for c, part, _ in parts if c == "cswap") / "plans"
            costs = pruned_costs(model, plans, task, adapter, task.example_inputs())
            (out / "costs.json").write_text(json.dumps(costs, indent=1) + "\n")
    setup.update({"curve_wall_seconds": curve_seconds, "total_seconds": round(time.perf_counter() - started, 1),
                  "curve_rc": rc})
    (out / "setup.json").write_text(json.dumps(setup, indent=1) + "\n")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
