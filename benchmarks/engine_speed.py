"""Exact engines vs the naive reference: wall time, the MAC bound, identical plans.

    python benchmarks/engine_speed.py                 # ResNet-20, M_k = 32 and 128, all layers
    python benchmarks/engine_speed.py --quick         # M_k = 16 and 32, for a smoke test

Runs C-SWAP three times per setting on a CIFAR-style ResNet-20 (1x28x28, Fashion-MNIST from
Debian's dataset-fashion-mnist, briefly trained here, seeded): `full` (a whole forward pass
per unit: the naive reference), `staged` (cached prefix, bitwise-equal scores) and `delta`
(plus the first reader's rank-one update). It asserts that the staged plan is byte-identical
to the naive one and that the delta plan makes the same decisions, prints the unavoidable MAC
share (benchmarks/bound.py) beside the measured time ratios, and a scaling series. Options add
the staged engine with several units per pass (`--unit-batches`) and the causal baselines
C-BP and AMP on both engines (`--baselines cbp,amp`). Results go to
docs/results/engine_speed.json and are quoted in docs/results/performance.md.

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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.datasets import fashion_mnist_root  # noqa: E402
from cswap import registry  # noqa: E402
from benchmarks.bound import unavoidable_share  # noqa: E402
from cswap.build import resolve_adapter, units_of  # noqa: E402
from cswap.interfaces import Analysis  # noqa: E402
from cswap.models.cifar_resnet import CifarResNet  # noqa: E402
from cswap.options import AnalysisOptions  # noqa: E402
from cswap.plan import PruningPlan  # noqa: E402
from cswap.pruner import progressive_prune  # noqa: E402
from cswap.tasks.classification import ClassificationTask  # noqa: E402
from cswap.tasks.idx_files import load_mnist_split  # noqa: E402

MEAN, STD = 0.2860, 0.3530


def fashion(split: str, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_mnist_split(fashion_mnist_root(), split)
    idx = np.random.default_rng(seed).permutation(len(labels))[:n]
    x = (torch.from_numpy(images[idx]).float() / 255 - MEAN) / STD
    return x[:, None].contiguous(), torch.from_numpy(labels[idx])


def quick_train(width: int, steps: int, seed: int = 0) -> nn.Module:
    """A few hundred SGD steps: enough for real structure (about 80% accuracy), seconds to run."""
    torch.manual_seed(seed)
    model = CifarResNet(depth=20, width=width, in_channels=1, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return fit(model, opt, steps, seed)


def fit(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> nn.Module:
    """`steps` batches of 128 fresh Fashion-MNIST training images (seeded), cross-entropy."""
    x, y = fashion("train", 128 * steps, seed)
    model.train()
    for i in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i * 128:(i + 1) * 128]), y[i * 128:(i + 1) * 128]).backward()
        opt.step()
    return model.eval()


def _setup(model, samples_per_class: int, seed: int, **options) -> Analysis:
    """The ResNet-20's analysis on 20,000 training images, S of M_k per class, the default test."""
    name, adapter = resolve_adapter("auto", model)
    x, y = fashion("train", 20000, seed + 1)
    task = ClassificationTask.from_tensors(x, y, samples_per_class)
    return Analysis(model, units_of(adapter, model, x[:1], verify=False), task,
                    registry.create("scorers", "class_probability"), registry.create("tests", "paired_t", {}),
                    adapter, name, torch.device("cpu"), AnalysisOptions(**options), example_inputs=x[:1])


def baseline(model, samples_per_class: int, name: str, engine: str, seed: int = 0):
    """A causal baseline criterion (cbp, amp) with the given engine: its plan and seconds."""
    a = _setup(model, samples_per_class, seed, engine=engine)
    t0 = time.perf_counter()
    plan = PruningPlan.from_analysis(a, registry.create("criteria", name).rank(a, seed))
    return plan, time.perf_counter() - t0


def analysis(model, samples_per_class: int, engine: str, seed: int = 0, unit_batch: int = 1):
    a = _setup(model, samples_per_class, seed, engine=engine, unit_batch=unit_batch)
    t0 = time.perf_counter()
    plan = PruningPlan.from_analysis(a, progressive_prune(a, seed))
    return plan, time.perf_counter() - t0, a.units


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples-per-class", type=int, nargs="+", default=[32, 128])
    p.add_argument("--quick", action="store_true", help="M_k = 16, 32 and a short scaling series")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--out", type=Path, default=REPO / "docs/results/engine_speed.json")
    p.add_argument("--engines", default="full,staged,delta", help="full (the naive reference) always runs")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--baselines", default="", help="e.g. cbp,amp: also time these causal baselines with "
                   "the full and the staged engine (asserted to give the same plan), at each M_k")
    p.add_argument("--unit-batches", default="", help="e.g. 4,8: also the staged engine evaluating that many "
                   "units per pass (pruning.unit_batch), asserted to give the staged plan")
    p.add_argument("--plans-dir", type=Path, help="also write every plan as JSON here (to check that a change "
                   "of the code leaves the plans byte-identical)")
    p.add_argument("--weights", type=Path, help="state dict of the ResNet-20 instead of training it "
                   "(fast_modes.py caches the same model in runs/fast_modes/)")
    args = p.parse_args()
    fashion_mnist_root()  # stop now, with the setup hint, on a machine without the data
    torch.set_num_threads(args.threads)
    settings = [16, 32] if args.quick else args.samples_per_class
    engines = ["full"] + [e for e in args.engines.split(",") if e in ("staged", "delta")]
    t0 = time.perf_counter()
    if args.weights:
        model = quick_train(16, 0)
        model.load_state_dict(torch.load(args.weights, weights_only=True))
    else:
        model = quick_train(16, args.train_steps)
    xt, yt = fashion("test", 2000, 5)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    how = f"loaded from {args.weights}" if args.weights else f"trained for {args.train_steps} steps"
    print(f"ResNet-20 {how} in {time.perf_counter() - t0:.0f} s: test accuracy {acc:.3f}")
    result = {"model": "CIFAR-style ResNet-20 (width 16), 1x28x28", "test_accuracy": acc,
              "threads": args.threads, "torch": torch.__version__, "runs": [], "scaling": []}
    _, adapter = resolve_adapter("auto", model)
    result["bound"] = unavoidable_share(model, adapter.units(model, xt[:1]), xt[:1])
    print("bound:", json.dumps(result["bound"]))

    for mk in settings:
        plans, times = {}, {}
        for engine in engines:
            plans[engine], times[engine], _ = analysis(model, mk, engine)
            print(f"M_k={mk:4d} {engine:7s} {times[engine]:8.1f} s  {plans[engine].category_counts()}", flush=True)
            if args.plans_dir:
                plans[engine].save(args.plans_dir / f"mk{mk}-{engine}.json")
        row = {"samples_per_class": mk, "seconds": times, "categories": plans["full"].category_counts()}
        if "staged" in plans:
            row["staged_plan_identical"] = plans["staged"].to_json() == plans["full"].to_json()
            assert row["staged_plan_identical"], "staged engine changed the plan"
            row["speedup_staged"] = times["full"] / times["staged"]
            row["time_share_staged"] = times["staged"] / times["full"]
            row["staged_vs_bound"] = row["time_share_staged"] / result["bound"]["share_cached_prefix"]
        if "delta" in plans:
            row["delta_same_decisions"] = [(s.unit, s.category) for s in plans["delta"].steps] == \
                                          [(s.unit, s.category) for s in plans["full"].steps]
            assert row["delta_same_decisions"], "delta engine changed a decision"
            row["speedup_delta"] = times["full"] / times["delta"]
            row["time_share_delta"] = times["delta"] / times["full"]
            row["delta_vs_bound"] = row["time_share_delta"] / result["bound"]["share_with_delta"]
        for k in [int(k) for k in args.unit_batches.split(",") if k]:
            plan, secs, _ = analysis(model, mk, "staged", unit_batch=k)
            same = plan.to_json() == plans["staged"].to_json()
            assert same, f"unit_batch {k} changed the plan"
            row.setdefault("unit_batch", []).append({"k": k, "seconds": secs, "plan_identical": same,
                                                     "speedup_vs_staged": times["staged"] / secs})
            print(f"M_k={mk:4d} staged, unit_batch {k}: {secs:8.1f} s (plan identical)", flush=True)
        for name in [n for n in args.baselines.split(",") if n]:
            timed = {engine: baseline(model, mk, name, engine) for engine in ("full", "auto")}
            same = [st.to_json() for st in timed["full"][0].steps] == [st.to_json() for st in timed["auto"][0].steps]
            assert same and timed["auto"][0].meta["engine"] == "staged", f"{name}: the staged engine changed the plan"
            row.setdefault("baselines", {})[name] = {
                "seconds_full": timed["full"][1], "seconds_staged": timed["auto"][1], "plan_identical": same,
                "speedup": timed["full"][1] / timed["auto"][1]}
            print(f"M_k={mk:4d} {name}: full {timed['full'][1]:.1f} s, staged {timed['auto'][1]:.1f} s "
                  f"({timed['full'][1] / timed['auto'][1]:.2f}x, same plan)", flush=True)
        result["runs"].append(row)
        _save(args.out, result)  # after every setting: a long run is never lost
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "seconds"}))

    # scaling: staged time against the number of samples and against the number of units.
    # The work per unit-sample is the unavoidable MACs of the bound, so "linear" means seconds
    # per (unit x sample x suffix MAC) stays flat while M or the width grows.
    done = {row["samples_per_class"]: row["seconds"]["staged"] for row in result["runs"] if "staged" in row["seconds"]}
    graph = adapter.units(model, xt[:1])
    for mk in ([] if args.skip_scaling else [8, 16, 32] if args.quick else [16, 32, 64, 128]):
        secs = done[mk] if mk in done else analysis(model, mk, "staged")[1]
        result["scaling"].append(_scaling_row("samples", model, graph, xt[:1], mk, secs, width=16))
        _save(args.out, result)
        print(f"scaling M_k={mk}: {secs:.1f} s", flush=True)
    for width in ([] if args.skip_scaling else [8, 16] if args.quick else [8, 16, 24, 32]):
        m = quick_train(width, 30)
        _, secs, graph = analysis(m, 16, "staged")
        result["scaling"].append(_scaling_row("units", m, graph, xt[:1], 16, secs, width=width))
        _save(args.out, result)
        print(f"scaling width={width}: {graph.num_units} units, {secs:.1f} s", flush=True)
    result["total_seconds"] = time.perf_counter() - t0
    _save(args.out, result)
    print(f"wrote {args.out}")


def _scaling_row(vary: str, model, graph, example, mk: int, secs: float, width: int) -> dict:
    """One point of a scaling series, with the work it had to do by the bound."""
    bound = unavoidable_share(model, graph, example)
    samples = 10 * mk
    work = graph.num_units * samples * bound["share_cached_prefix"] * bound["macs_full_forward"]
    return {"vary": vary, "width": width, "samples_per_class": mk, "samples": samples, "units": graph.num_units,
            "seconds": secs, "macs_full_forward": bound["macs_full_forward"], "unavoidable_macs": work,
            "ns_per_unavoidable_mac": 1e9 * secs / work}


def _save(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
