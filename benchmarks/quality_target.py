"""How much each method removes under a quality target (issue #24): `pruning.max_drop: 1` and
`max_class_drop: 5` at 95 % confidence, least-squares recovery, on the six models of the
recovery benchmark, 3 seeds. Writes docs/results/quality_target.md and .json.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/quality_target.py                 # every model
    OMP_NUM_THREADS=1 python benchmarks/quality_target.py --models demo,resnet20_w8 --seeds 3
    python benchmarks/quality_target.py --report-only                                 # the page from the caches

For every model, method (C-SWAP's defaults, `--preset paper`, AMP, magnitude, random) and
seed: one analysis (its plan cached), then the quality search of `cswap prune` (replays on
validation data drawn from the sample split apart from S; `cswap.quality_search`), then, at
the chosen prefix only, the test split: the realised drop of the metric and of its worst
class, the share of parameters and MACs removed, and the speed-up measured on this CPU at
batch 1 (original and pruned timed in turns, `cswap.metrics.latencies_ms`). The test split is
the model's whole held-out split (`eval_limit` lifted), never used to choose. How often the
realised test drop exceeded the target says how well the bound is calibrated.

Resumable: each plan and each (plan, target) result is cached under --work and skipped when
present; the page is rebuilt from the caches every time. Each result records the machine's
load average when it ran (the machine is shared: compare within a run, not across machines).

Data: the demo ships with the package; the Fashion-MNIST models read the full Fashion-MNIST
locally (`apt-get install dataset-fashion-mnist`, or CSWAP_FASHION_MNIST=DIR, see
benchmarks/datasets.py) and their checkpoints in benchmarks/checkpoints/; `ddrnet_scenes`
needs `OMP_NUM_THREADS=1 python benchmarks/segmentation_fashion_scenes.py --train-only` first
(about 12-20 min; its config lands in runs/seg_fashion_scenes/).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.chdir(REPO_ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODELS = ("demo", "resnet20_w8", "mobilenetv2", "resnet20_w32", "vit_p7_d128", "ddrnet_scenes")
# label -> (criterion, preset): every method with the default target's least-squares recovery
METHODS = {"cswap": ("cswap", None), "cswap paper": ("cswap", "paper"), "amp": ("amp", None),
           "magnitude": ("magnitude", None), "random": ("random", None)}
CRITERION_OPTIONS = {"ddrnet_scenes": {"amp": {"metric": "mean_sigma"}}}  # AMP's KL needs per-image logits
TARGET = {"max_drop": 1.0, "max_class_drop": 5.0, "confidence": 0.95}


def load_analysis(model: str, preset: str | None):
    """The model's analysis as its config builds it (with `preset`), its test split whole."""
    from benchmarks.recovery import MODELS as CONFIGS
    from cswap.build import analysis_from_config
    from cswap.config import load_config
    from cswap.packaged import config_argument

    if model != "demo":
        from benchmarks.datasets import fashion_mnist_root

        fashion_mnist_root()  # stops at once with the setup hint when the data is missing
    path = config_argument(CONFIGS[model])
    if not Path(path).is_file():
        raise SystemExit(f"{CONFIGS[model]} is missing: run `OMP_NUM_THREADS=1 python "
                         "benchmarks/segmentation_fashion_scenes.py --train-only` first")
    cfg = load_config(path, ["task.options.eval_limit=null"], preset=preset)
    analysis, _ = analysis_from_config(cfg)
    return analysis


def make_plan(analysis, label: str, model: str, seed: int, path: Path) -> dict:
    """The method's plan for this seed (cached at `path`) and its analysis time."""
    from cswap import registry
    from cswap.plan import PruningPlan

    if path.is_file():
        return json.loads(path.read_text())
    name, _ = METHODS[label]
    started = time.perf_counter()
    ranking = registry.create("criteria", name, CRITERION_OPTIONS.get(model, {}).get(name)).rank(analysis, seed)
    plan = PruningPlan.from_analysis(analysis, ranking)
    record = {"label": label, "seconds": time.perf_counter() - started, "plan": plan.to_json()}
    _write(path, record)
    return record


def unpruned(analysis, path: Path) -> dict:
    """The original model's test outcomes (cached): its metric and every class's."""
    if not path.is_file():
        outcomes = analysis.task.outcomes(analysis.model, analysis.device)
        _write(path, {"metric": outcomes.metric(), "classes": outcomes.per_class().tolist(), "samples": len(outcomes),
                      "params": sum(p.numel() for p in analysis.model.parameters())})
    return json.loads(path.read_text())


def measure(analysis, plan, seed: int, before) -> dict:
    """The quality search on validation data, then the chosen model on the test split
    (`before`: the original's test outcomes)."""
    from cswap.metrics import count_macs
    from cswap.options import Target
    from cswap.quality import check
    from cswap.removal import count_params
    from cswap.replay import ReplayData, prune

    a, target = analysis, Target(**TARGET)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    data = ReplayData.for_task(a.task, plan, target)
    pruned = prune(plan, a.model, target, data, adapter=a.adapter, graph=a.units)
    after = a.task.outcomes(pruned.model, a.device)
    test = check(before, after, None, None, target.confidence)
    x = a.example_inputs[:1].to(a.device)
    worst = max(test.classes, key=lambda k: test.classes[k].drop)
    chosen = pruned.search["chosen"]
    return {
        "seed": seed, "steps": pruned.steps, "plan_steps": len(plan.steps),
        "params_removed": 1 - count_params(pruned.model) / count_params(a.model),
        "macs_removed": 1 - count_macs(pruned.model, x) / count_macs(a.model, x),
        "validation": {"drop": chosen["drop"], "bound": chosen["bound"], "samples": chosen["samples"],
                       "worst_class": chosen["worst_class"], "method": chosen["method"]},
        "test": {"before": test.overall.before, "after": test.overall.after, "drop": test.overall.drop,
                 "samples": test.overall.samples, "worst_class": {"class": worst, "name": test.name_of(worst),
                                                                  "drop": test.classes[worst].drop},
                 "classes": {str(k): d.drop for k, d in test.classes.items()}},
        "replays": pruned.search["replays"], "search_seconds": pruned.search["seconds"],
        "message": pruned.search["message"], "trace": pruned.search["trace"],
        "seconds": time.perf_counter() - started, "load_average": [round(load, 2), round(os.getloadavg()[0], 2)],
    }


def speed(analysis, plan, steps: int, repeats: int = 3) -> dict:
    """The chosen model's measured CPU speed-up over the original, at batch 1 and 32: the shapes
    (latency does not depend on the repaired weights) timed in turns with the original, the
    median of `repeats` measurements (batch 1 of a model this small is mostly fixed costs, and
    the machine is shared)."""
    from cswap.metrics import latencies_ms
    from cswap.options import Target
    from cswap.replay import removed_model

    a = analysis
    pruned = removed_model(plan, a.model, steps, Target(), a.adapter).eval()
    one = a.example_inputs[:1].to(a.device)
    out = {"load_average": round(os.getloadavg()[0], 2)}
    for batch in (1, 32):
        x = one.expand(batch, *one.shape[1:]).contiguous()
        times = [latencies_ms([a.model, pruned], x, min_seconds=1.0) for _ in range(repeats)]
        out[f"batch{batch}"] = float(np.median([t[0] / t[1] for t in times]))
        out[f"ms_batch{batch}"] = [float(np.median([t[i] for t in times])) for i in (0, 1)]
    return out


def run_model(model: str, methods: list[str], seeds: list[int], work: Path) -> None:
    from cswap.plan import PruningPlan

    analyses, before = {}, None
    for label in methods:
        preset = METHODS[label][1]
        for seed in seeds:
            out = work / model / f"{label.replace(' ', '_')}-seed{seed}.json"
            done = json.loads(out.read_text()) if out.is_file() else None
            if done is not None and "speed" in done:
                continue
            if preset not in analyses:
                analyses[preset] = load_analysis(model, preset)
            a = analyses[preset]
            if done is not None:  # measured before speed was: time its shapes now
                record = json.loads(out.with_suffix(".plan.json").read_text())
                _write(out, {**done, "speed": speed(a, PruningPlan.from_json(record["plan"]), done["steps"])})
                continue
            unpruned(a, work / model / "unpruned.json")
            before = before if before is not None else a.task.outcomes(a.model, a.device)  # one model, one test split
            record = make_plan(a, label, model, seed, out.with_suffix(".plan.json"))
            plan = PruningPlan.from_json(record["plan"])
            result = measure(a, plan, seed, before)
            result["speed"] = speed(a, plan, result["steps"])
            _write(out, {"model": model, "method": label, "analysis_seconds": record["seconds"], **result})
            print(f"{model} {label} seed {seed}: {100 * result['params_removed']:.1f} % removed, test drop "
                  f"{result['test']['drop']:+.2f} pt, worst class {result['test']['worst_class']['drop']:+.2f} pt, "
                  f"x{result['speed']['batch1']:.2f} (batch 1)", flush=True)


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("runs/quality_target"))
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS] + [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        p.error(f"unknown {unknown}; methods: {', '.join(METHODS)}; models: {', '.join(MODELS)}")
    if not args.report_only:
        for model in args.models.split(","):
            run_model(model, methods, list(range(args.seeds)), args.work)
    from benchmarks.quality_target_report import write_report

    print(write_report(args.work, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
