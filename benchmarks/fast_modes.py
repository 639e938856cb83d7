"""Fast modes vs the exact algorithm: unit-forward passes, wall time, SAUCE, agreement.

    python benchmarks/fast_modes.py                  # ResNet-20 and the wide ViT, M_k = 16
    python benchmarks/fast_modes.py --quick          # fewer training steps, M_k = 8

Two Fashion-MNIST models (Debian's dataset-fashion-mnist, trained here, seeded):
- the CIFAR-style ResNet-20 (width 16) of `engine_speed.py`, a dense model;
- an over-parameterised ViT (timm, 1x28x28, 7x7 patches, width 64, 4 blocks, MLP ratio 8:
  2,048 MLP neurons and 16 heads as units), the kind of model with many redundant units.

For each model C-SWAP runs exact and with each fast mode (`cswap/fast.py`) on the same S;
every plan is replayed at parameter ratios 0, 0.1, ... on 2,000 test images and scored with
SAUCE. Reported per mode: trials (unit-forward passes), trial passes counted by the share of
S they ran, wall time, their ratios to exact, SAUCE and its difference to exact, category
counts and the share of units whose category matches the exact plan. Results go to
docs/results/fast_modes.json and are quoted in docs/results/performance.md.

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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from engine_speed import fashion, fit, quick_train  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.datasets import fashion_mnist_root  # noqa: E402
from cswap import registry  # noqa: E402
from cswap.build import resolve_adapter  # noqa: E402
from cswap.curves import replay_curve  # noqa: E402
from cswap.options import FastOptions  # noqa: E402
from cswap.pruner import progressive_prune  # noqa: E402
from cswap.sauce import sauce  # noqa: E402
from cswap.tasks.classification import ClassificationTask  # noqa: E402

MODES = {
    "exact": {},
    "sequential": {"sequential": True},
    "sequential(8 looks)": {"sequential": True, "looks": 8},
    "group+taylor": {"group_testing": True, "taylor_order": True},
    "group+taylor+sequential": {"group_testing": True, "taylor_order": True, "sequential": True},
    "group(non-critical)+taylor": {"group_testing": True, "taylor_order": True, "group_accept": "non_critical"},
    "group(non-critical)+taylor+sequential": {"group_testing": True, "taylor_order": True,
                                              "group_accept": "non_critical", "sequential": True},
}
RATIOS = [round(0.1 * i, 1) for i in range(10)]


def wide_vit(steps: int, seed: int = 0) -> nn.Module:
    """A ViT far wider in its MLPs than the task needs, trained with Adam."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=4,
                              num_heads=4, mlp_ratio=8.0, class_token=True, global_pool="token")
    return fit(model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05), steps, seed)


TITLES = {"resnet20": "CIFAR-style ResNet-20 (width 16)",
          "vit": "ViT 1x28x28, patch 7, width 64, depth 4, MLP ratio 8 (timm)"}


def trained(name: str, quick: bool, seed: int, cache: Path) -> nn.Module:
    """The model, trained once and then loaded from `cache` (a plain state dict)."""
    steps = {"resnet20": 60 if quick else 300, "vit": 100 if quick else 400}[name]
    path = cache / f"{name}-steps{steps}-seed{seed}.pt"
    started = time.perf_counter()
    if path.exists():
        model = quick_train(16, 0, seed) if name == "resnet20" else wide_vit(0, seed)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = quick_train(16, steps, seed) if name == "resnet20" else wide_vit(steps, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    print(f"{name}: trained {steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
    return model


def run_mode(model, graph, adapter_name, adapter, task, fast: dict, seed: int, unpruned: float):
    started = time.perf_counter()
    plan = progressive_prune(model, graph, task.manifold(seed), registry.create("scorers", "class_probability"),
                             registry.create("tests", "paired_t", {}), adapter=adapter_name, seed=seed,
                             progress=False, stages=adapter.stages, fast=FastOptions(**fast))
    seconds = time.perf_counter() - started
    curve = replay_curve(model, plan, task, RATIOS, adapter, "accuracy", unpruned)
    return plan, seconds, curve


def benchmark(name: str, model: nn.Module, samples_per_class: int, seed: int, modes: list[str]) -> dict:
    x, y = fashion("train", 20000, seed + 1)
    xt, yt = fashion("test", 2000, 5)
    task = ClassificationTask.from_tensors(x, y, samples_per_class, test=(xt, yt), batch_size=64)
    adapter_name, adapter = resolve_adapter("auto", model)
    graph = adapter.units(model, x[:1])
    out = {"model": name, "units": graph.num_units, "samples_per_class": samples_per_class,
           "accuracy": task.evaluate(model)["accuracy"], "modes": {}}
    print(f"{name}: {graph.num_units} units, accuracy {out['accuracy']:.4f}", flush=True)
    exact_categories = None
    for mode in ["exact"] + [m for m in modes if m != "exact"]:  # exact first: the reference
        fast = MODES[mode]
        plan, seconds, curve = run_mode(model, graph, adapter_name, adapter, task, fast, seed, out["accuracy"])
        categories = {str(s.unit): s.category for s in plan.steps}
        if mode == "exact":
            exact_categories = categories
            trials = sample_passes = plan.meta["units_tested"]
        else:
            trials, sample_passes = plan.meta["fast"]["trials"], plan.meta["fast"]["trial_sample_passes"]
        row = {
            "seconds": round(seconds, 1), "trials": trials, "trial_sample_passes": sample_passes,
            "categories": plan.meta["categories"],
            "sauce": sauce([r["params_ratio"] for r in curve], [100 * r["accuracy"] for r in curve]),
            "curve": [(round(r["params_ratio"], 4), round(r["accuracy"], 4)) for r in curve],
            "agreement": sum(categories.get(u) == c for u, c in exact_categories.items()) / len(exact_categories),
        }
        base = out["modes"].get("exact", row)
        row.update({"trials_saved_x": round(base["trials"] / max(1, row["trials"]), 2),
                    "sample_passes_saved_x": round(base["trial_sample_passes"] / max(1e-9, row["trial_sample_passes"]), 2),
                    "speedup": round(base["seconds"] / max(1e-9, row["seconds"]), 2),
                    "sauce_minus_exact": round(row["sauce"] - base["sauce"], 2)})
        out["modes"][mode] = row
        print(f"  {mode:24s} {seconds:7.1f} s  trials {trials:5d} ({row['trials_saved_x']}x fewer), sample passes "
              f"{sample_passes:8.1f} ({row['sample_passes_saved_x']}x), SAUCE {row['sauce']:.2f} "
              f"({row['sauce_minus_exact']:+.2f}), agreement {row['agreement']:.3f} {row['categories']}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--samples-per-class", type=int, default=16)
    p.add_argument("--models", default="resnet20,vit")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {list(MODES)} (exact always runs)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "docs/results/fast_modes.json")
    p.add_argument("--cache", type=Path, default=REPO / "runs/fast_modes", help="trained models (not committed)")
    args = p.parse_args()
    fashion_mnist_root()  # stop now, with the setup hint, on a machine without the data
    torch.set_num_threads(args.threads)
    mk = 8 if args.quick else args.samples_per_class
    result = {"threads": args.threads, "torch": torch.__version__, "seed": args.seed, "runs": []}
    t0 = time.perf_counter()
    for name in args.models.split(","):
        if name not in TITLES:
            raise SystemExit(f"unknown model {name!r}; use {', '.join(TITLES)}")
        model = trained(name, args.quick, args.seed, args.cache)
        title = TITLES[name]
        result["runs"].append({"title": title, **benchmark(name, model, mk, args.seed, args.modes.split(","))})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")  # after each model: nothing lost
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
