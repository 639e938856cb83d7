"""Object detection on real images: a tiny torchvision RetinaNet on Fashion-MNIST scenes.

No COCO / VOC can be downloaded here, so this composes a detection dataset from real
images: each scene is a 64x64 canvas of sensor-like noise with 1-3 Fashion-MNIST items
(Debian package `dataset-fashion-mnist`) of `--classes`, rescaled to 16-32 px, at random
places, with tight boxes around the visible pixels (`tasks.detection_scenes.make_scenes`).
Train scenes use items of Fashion-MNIST's train split, val/test scenes items of its test
split (so no item seen in training is evaluated).

Steps: compose scenes -> train `tiny_retinanet` (torchvision RetinaNet: small CNN + FPN +
RetinaNet head, focal loss) on CPU -> curves for C-SWAP, random and magnitude (mAP@0.5 on
the test split vs parameters removed), SAUCE, C-SWAP's categories, and params / MACs /
latency before and after C-SWAP's own pruning (its non-critical units) -> `--out`.
Also, as a check of the scorer: C-SWAP with `detection_match`'s `false_positive_penalty`
(`--fp-penalty`, 0 skips it), and `diagnostics.csv`: recall@0.5, false positives per image
and mean sigma on the test split along each criterion's seed-0 plan.

Data and checkpoint go to `--work` (default runs/detection_fashion_scenes, gitignored);
an existing checkpoint is loaded (weights_only) and training is skipped.

    python benchmarks/detection_fashion_scenes.py --out docs/results/detection

Everything is measured with one torch thread (`--threads`).

Data: the full Fashion-MNIST, read locally (`apt-get install dataset-fashion-mnist`, or
CSWAP_FASHION_MNIST=DIR; see benchmarks/datasets.py); without it the script stops at once
with that hint.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # cswap and the repository's plugins (tasks, scorers, adapters, criteria)

from benchmarks.datasets import fashion_mnist_root  # noqa: E402
from cswap.options import Target  # noqa: E402
from cswap.replay import removed_model, steps_for  # noqa: E402

FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot")


def compose(path: Path, classes: tuple[int, ...], splits: dict[str, int], size: int, seed: int) -> dict:
    """Scenes per split; train from Fashion-MNIST train items, the other splits from its test items."""
    from cswap.tasks.detection_scenes import make_scenes

    arrays = {}
    for j, (split, n) in enumerate(splits.items()):
        images, boxes, labels = make_scenes(n, size=size, source="fashion_mnist", classes=classes, max_objects=3,
                                            object_sizes=(16, 32), max_overlap=0.1,
                                            fashion_split="train" if split == "train" else "test",
                                            fashion_root=fashion_mnist_root(),
                                            seed=seed + 1000 * j)
        arrays.update({f"{split}_images": images, f"{split}_boxes": boxes, f"{split}_labels": labels})
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, classes=np.asarray([FASHION_NAMES[c] for c in classes]), **arrays)
    objects = {s: int((arrays[f"{s}_labels"] >= 0).sum()) for s in splits}
    return {"images": dict(splits), "objects": objects}


def train(model, task, n_train: int, steps: int, lr: float, batch: int, seed: int) -> dict:
    from cswap.models.detection_training import train_detector

    x = task.images("train", range(n_train))
    y = task.targets("train", range(n_train), 3)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train_detector(model, x, y, steps=steps, lr=lr, batch_size=batch, seed=seed, log_every=max(1, steps // 10))
    return {"train_seconds": round(time.perf_counter() - t0, 1), "steps": steps, "lr": lr, "batch": batch,
            "train_images": n_train, "seed": seed}


def params_steps(setup, plan, ratio: float) -> int:
    """The fewest steps of `plan` removing `ratio` of the parameters (`cswap.replay.steps_for`)."""
    return steps_for(plan, setup.model, Target(params_ratio=ratio), setup.adapter)[0]


def costs_at(setup, plan, k: int, label: str, repeats: int) -> dict:
    """mAP and params / MACs / latency of the model with the first k units of `plan` removed."""
    from cswap.metrics import model_costs

    pruned = removed_model(plan, setup.model, k, Target(), setup.adapter)  # these plans replay without recovery
    x = setup.task.example_inputs()
    return {"plan": label, "units_removed": k, **{m: v for m, v in setup.task.evaluate(pruned).items()
                                                  if m in ("mAP50", "mAP")},
            **model_costs(pruned.eval(), x, batch=32, repeats=repeats)}


@torch.no_grad()
def diagnose(setup, plan, k: int, label: str) -> dict:
    """Where mAP is lost: recall and false positives of the post-NMS detections, next to the
    mean detection_match sigma on the same (test) images. sigma only sees, per ground-truth
    box, the best IoU x score over all anchors; false positives do not lower it."""
    from torchvision.ops import box_iou

    from cswap.scorers.detection import DetectionMatchScorer

    task = setup.task
    pruned = removed_model(plan, setup.model, k, Target(), setup.adapter).eval()
    detections, truth = task.detections(pruned)
    found = total = 0
    false_pos = {0.05: 0, 0.3: 0}
    for det, (gt_boxes, gt_labels) in zip(detections, truth):
        total += len(gt_boxes)
        matched = torch.zeros(len(gt_boxes), dtype=torch.bool)
        iou = box_iou(det["boxes"], gt_boxes) if len(gt_boxes) else torch.zeros(len(det["boxes"]), 0)
        for d in torch.argsort(det["scores"], descending=True).tolist():  # VOC-style greedy matching
            same = (gt_labels == det["labels"][d]) & ~matched
            cand = torch.where(same, iou[d], torch.full_like(iou[d], -1.0)) if len(gt_boxes) else iou[d]
            if len(gt_boxes) and cand.max() >= 0.5:
                matched[int(cand.argmax())] = True
            else:
                for t in false_pos:
                    false_pos[t] += int(det["scores"][d] >= t)
        found += int(matched.sum())
    split, idx = task.options.eval_split, task._eval_indices()
    scorer, sigmas = DetectionMatchScorer(), []
    for i in range(0, len(idx), 64):
        batch = idx[i:i + 64]
        sigmas.append(scorer.score(pruned(task.images(split, batch)), task.targets(split, batch, 3)).values)
    n = len(detections)
    removed = plan.cumulative_params_removed()[k] / plan.params_total
    return {"plan": label, "units_removed": k, "params_ratio": round(removed, 4),
            "mAP50": average_precision_50(detections, truth, task.num_classes()),
            "recall50": found / max(total, 1), "fp_per_image_score0.05": false_pos[0.05] / n,
            "fp_per_image_score0.3": false_pos[0.3] / n, "mean_sigma": float(np.mean(np.concatenate(sigmas)))}


def average_precision_50(detections, truth, num_classes: int) -> float:
    from cswap.tasks.detection_ap import average_precision

    return average_precision(detections, truth, num_classes, iou_thresholds=(0.5,))["mAP50"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/results/detection"))
    p.add_argument("--work", type=Path, default=Path("runs/detection_fashion_scenes"),
                   help="scenes, checkpoint and plans (gitignored)")
    p.add_argument("--classes", default="0,1,7,8", help="Fashion-MNIST classes (T-shirt, Trouser, Sneaker, Bag)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--width", type=int, default=8, help="tiny_retinanet backbone width")
    p.add_argument("--fpn", type=int, default=16, help="FPN / head channels")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--samples-per-class", type=int, default=32, help="M_k: images of S per class")
    p.add_argument("--ratios", default=",".join(f"{0.05 * i:.2f}" for i in range(19)), help="0, 0.05, ..., 0.9")
    p.add_argument("--seeds", default="cswap=3,random=3,magnitude=1",
                   help="criterion=number of seeds (magnitude is deterministic)")
    p.add_argument("--fp-penalty", type=float, default=0.5,
                   help="also run C-SWAP with detection_match's false_positive_penalty (0: skip)")
    p.add_argument("--fp-seeds", type=int, default=3, help="seeds of the false-positive-penalised C-SWAP run")
    p.add_argument("--latency-repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-only", action="store_true", help="stop after composing the scenes and training")
    args = p.parse_args(argv)
    fashion_mnist_root()  # stop now, with the setup hint, on a machine without the data
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)

    from cswap import registry
    from cswap.config import parse_config
    from cswap.curves import CriterionSpec, parse_ratios, run_curves
    from cswap.files import load_checkpoint
    from cswap.models.detection import tiny_retinanet
    from cswap.reports import CurveResult, rows_csv, write_curve_outputs

    started = time.perf_counter()
    out, work = args.out.resolve(), args.work.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    classes = tuple(int(c) for c in args.classes.split(","))
    data = work / "scenes.npz"
    data_info_path = work / "scenes.json"
    if not data.is_file():
        info = compose(data, classes, {"train": args.train, "val": args.val, "test": args.test}, args.size, seed=0)
        data_info_path.write_text(json.dumps(info, indent=1) + "\n")
    data_info = json.loads(data_info_path.read_text()) if data_info_path.is_file() else {}

    model_kwargs = {"num_classes": len(classes), "in_channels": 1, "width": args.width, "fpn_channels": args.fpn}
    task_options = {"root": str(data), "manifold_split": "train", "eval_split": "test",
                    "samples_per_class": args.samples_per_class, "batch_size": 32}
    task = registry.create("tasks", "detection", task_options)
    weights = work / "tiny_retinanet.pt"
    train_info_path = work / "tiny_retinanet.json"
    torch.manual_seed(0)
    model = tiny_retinanet(**model_kwargs)
    if weights.is_file():
        model.load_state_dict(load_checkpoint(weights))  # weights_only=True
        model.eval()
        print(f"loaded {weights} (training skipped)", flush=True)
    else:
        info = train(model, task, args.train, args.steps, args.lr, args.batch, seed=0)
        torch.save(model.state_dict(), weights)
        train_info_path.write_text(json.dumps(info, indent=1) + "\n")
    train_info = json.loads(train_info_path.read_text()) if train_info_path.is_file() else {}
    val_task = registry.create("tasks", "detection", {**task_options, "eval_split": "val"})
    t0 = time.perf_counter()
    trained = {"val": val_task.evaluate(model), "test": task.evaluate(model)}
    eval_seconds = (time.perf_counter() - t0) / 2
    print(f"unpruned: val mAP50 {trained['val']['mAP50']:.4f}, test mAP50 {trained['test']['mAP50']:.4f}", flush=True)
    if args.train_only:
        return 0

    cfg = {
        "name": "tiny_retinanet_fashion_scenes", "seed": 0, "threads": args.threads,
        "model": {"source": "cswap", "name": "tiny_retinanet", "kwargs": model_kwargs, "weights": str(weights)},
        "task": {"name": "detection", "options": task_options},
        "adapter": {"name": "detection"},
        "scorer": {"name": "detection_match", "options": {}},
        "test": {"name": "paired_t", "options": {"alpha": 0.05, "voting": "per_class"}},
        "pruning": {"params_ratio": None},
        "output": {"dir": str(work), "latency_repeats": args.latency_repeats},
    }
    # the written config names repository paths relative to the root (run `cswap curve` from there)
    portable = json.loads(json.dumps(cfg).replace(str(REPO_ROOT) + "/", ""))
    (out / "config.yaml").write_text(yaml.safe_dump(portable, sort_keys=False))

    # ---- curves: one analysis per (criterion, seed), replayed at every ratio ----------------
    from cswap.curves import setup_from_config

    setup = setup_from_config(parse_config(cfg))
    ratios = parse_ratios(args.ratios)
    seeds = {k: int(v) for k, v in (item.split("=") for item in args.seeds.split(","))}
    specs = [CriterionSpec(name, name) for name in seeds]
    contexts = {name: setup.context for name in seeds}
    if args.fp_penalty > 0:
        from cswap.build import build_scorer
        from cswap.config import PluginRef

        label = f"cswap+fp{args.fp_penalty:g}"
        specs.append(CriterionSpec(label, "cswap"))
        seeds[label] = args.fp_seeds
        scorer = build_scorer(PluginRef(name="detection_match", options={"false_positive_penalty": args.fp_penalty}),
                              setup.task)
        contexts[label] = {**setup.context, "scorer": scorer}
    rows, analyses, unpruned = [], [], None
    for spec in specs:
        t0 = time.perf_counter()
        part = run_curves(setup.model, setup.graph, setup.task, [spec], list(range(seeds[spec.label])), ratios,
                          adapter_name=setup.adapter_name, adapter=setup.adapter, context=contexts[spec.label],
                          plans_dir=work / "plans", progress=False)
        rows += part.rows
        analyses += part.analyses
        unpruned = part.unpruned
        for a in part.analyses:
            print(f"{spec.label} seed {a['seed']}: SAUCE {a['sauce']:.2f}, analysis {a['seconds']:.0f} s, "
                  f"categories {a['categories']}", flush=True)
        print(f"{spec.label}: {time.perf_counter() - t0:.0f} s with replay", flush=True)
    result = CurveResult(setup.task.metric, unpruned, int(sum(q.numel() for q in setup.model.parameters())),
                         rows, analyses)
    meta = {"config": cfg["name"], "model": "cswap:tiny_retinanet", "seeds": seeds, "ratios": list(ratios),
            "criteria": [asdict(s) for s in specs]}
    write_curve_outputs(result, out, "tiny RetinaNet, Fashion-MNIST scenes (mAP@0.5, test)", meta)

    # ---- costs before / after: C-SWAP's own stopping point (its non-critical units) ----------
    from cswap.plan import PruningPlan

    plan = PruningPlan.load(work / "plans" / "cswap-seed0.json")
    costs = [costs_at(setup, plan, 0, "unpruned", args.latency_repeats)]
    ratio = plan.cumulative_params_removed()[plan.num_noncritical] / plan.params_total
    costs.append(costs_at(setup, plan, plan.num_noncritical, "cswap seed 0: its non-critical units", args.latency_repeats))
    for name in ("random", "magnitude"):
        other = PruningPlan.load(work / "plans" / f"{name}-seed0.json")
        costs.append(costs_at(setup, other, params_steps(setup, other, ratio), f"{name} seed 0 at the same params ratio",
                              args.latency_repeats))


    # ---- diagnostics: recall, false positives and sigma along each seed-0 plan -------------
    diagnostics = []
    for spec in specs:
        other = PruningPlan.load(work / "plans" / f"{spec.label.replace('/', '-')}-seed0.json")
        for r in (0.0, 0.1, 0.2, 0.3, 0.4, ratio):
            diagnostics.append(diagnose(setup, other, params_steps(setup, other, r), spec.label))
    (out / "diagnostics.csv").write_text(rows_csv(diagnostics))

    (out / "setup.json").write_text(json.dumps({
        "command": " ".join(["python benchmarks/detection_fashion_scenes.py", *(sys.argv[1:] if argv is None else argv)]),
        "args": {k: str(v) for k, v in vars(args).items()}, "data": data_info, "training": train_info,
        "params": result.params_total, "units": setup.graph.num_units, "layers": len(setup.graph.layers),
        "skipped": setup.graph.skipped, "trained_eval": trained, "eval_seconds": round(eval_seconds, 2),
        "costs": costs, "cswap_stop_params_ratio": ratio, "total_seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "threads": torch.get_num_threads(), "load_average": os.getloadavg()},
    }, indent=1) + "\n")
    print(f"done in {time.perf_counter() - started:.0f} s; outputs in {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
