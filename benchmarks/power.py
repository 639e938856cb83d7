"""Neutral must mean harmless (issue #26): what a small sample set does to the paper's rule
(`neutral: not_significant`) and to the equivalence rule (`neutral: equivalent`, TOST within
+-margin), with least-squares recovery calibrated on the same small S.

    python benchmarks/power.py                           # demo and ResNet-20 w8, 3 seeds
    python benchmarks/power.py --models demo --seeds 1   # minutes
    python benchmarks/power.py --report-only             # rebuild docs/results/power.md

For every model, M_k in --samples, rule (--rules: `not_significant`, `equivalent:<margin>`)
and seed, one C-SWAP analysis (the model's config otherwise: effect absolute, per-class
voting, alpha 0.05), then the plan replayed at its non-critical point and at 50 % of the
parameters removed, each without recovery and with least squares on S (the run's default
calibration: S itself, so at M_k = 2 the repair sees 20 images). Recorded: units called
neutral / detrimental / inconclusive / critical, the share of parameters the non-critical
units hold, accuracy on the held-out split, the test's minimum detectable effect on S
(cswap/power.py, the worst class, 80 % power) and how many least-squares re-fits had to
choose their ridge on held-out samples (cswap/heldout.py), and where some did, the accuracy
the plain re-fit (every system solved as if well determined, as before) gives instead.

Resumable: each (model, rule, M_k, seed) result is one JSON file under --work, written when
it is complete and skipped when present; the report is rebuilt from them every time
(docs/results/power.md, power.json). Timings are from one process on a shared 2-core machine.

Data: the demo ships with the package; ResNet-20 w8 (and w32, the ViT: `--models`) read the
full Fashion-MNIST locally
(`apt-get install dataset-fashion-mnist`, or CSWAP_FASHION_MNIST=DIR, see
benchmarks/datasets.py) and its checkpoint in benchmarks/checkpoints/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.chdir(REPO_ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODELS = {"demo": "demo", "resnet20_w8": "configs/fashion_mnist_resnet20_w8.yaml",
          "resnet20_w32": "configs/fashion_mnist_resnet20_w32.yaml",
          "vit_p7_d128": "configs/fashion_mnist_vit_p7_d128.yaml"}
SAMPLES = (2, 4, 8, 16, 32, 64)
RULES = ("not_significant", "equivalent:0.01", "equivalent:0.02", "equivalent:0.05")
TARGET = 0.5  # the demo's default target: half the parameters
CATEGORIES = ("neutral", "detrimental", "inconclusive", "critical")


def load_analysis(model: str):
    from cswap.build import analysis_from_config
    from cswap.config import load_config
    from cswap.packaged import config_argument

    if model != "demo":
        from benchmarks.datasets import fashion_mnist_root

        fashion_mnist_root()  # stops at once with the setup hint when the data is missing
    analysis, _ = analysis_from_config(load_config(config_argument(MODELS[model]), []))
    return analysis


def with_rule(analysis, rule: str):
    """The analysis with the test's `neutral` rule (and margin) set."""
    from cswap import registry

    neutral, _, margin = rule.partition(":")
    options = {**analysis.test.options.model_dump(), "neutral": neutral,
               **({"margin": float(margin)} if margin else {})}
    return replace(analysis, test=registry.create("tests", "paired_t", options))


def baseline_power(analysis, manifold, samples: int) -> dict:
    """The test's power on S from one forward pass of the unpruned model (cswap/power.py)."""
    from cswap.power import analysis_power

    return analysis_power(analysis, manifold, samples).to_json()


def deployed(analysis, plan, k: int, manifold, recovery: str) -> dict:
    """Accuracy of the plan's first k steps, replayed as `cswap prune` does
    (`cswap.replay.replay_steps`), repaired by `recovery` on S itself."""
    from cswap.options import Target
    from cswap.replay import ReplayData, replay_steps

    a = analysis
    out = replay_steps(plan, a.model, k, Target(recovery=recovery), ReplayData(manifold, manifold),
                       adapter=a.adapter, graph=a.units)
    result = {"accuracy": a.task.evaluate(out.model, a.device)[a.task.metric]}
    if out.recovery is not None:
        result["held_out_fits"], result["left_unrepaired"] = out.recovery.held_out()
    return result


@contextmanager
def plain_least_squares():
    """Least squares as it was before held-out ridge selection: every system treated as well
    determined (cswap/heldout.py's ROWS_PER_COLUMN set to 0 for the duration)."""
    import cswap.heldout

    saved = cswap.heldout.ROWS_PER_COLUMN
    cswap.heldout.ROWS_PER_COLUMN = 0
    try:
        yield
    finally:
        cswap.heldout.ROWS_PER_COLUMN = saved


def run_one(analysis, rule: str, samples: int, seed: int) -> dict:
    from cswap.plan import PruningPlan
    from cswap.pruner import progressive_prune

    a = with_rule(analysis, rule)
    manifold = a.task.manifold(seed, samples)
    started = time.perf_counter()
    plan = PruningPlan.from_analysis(a, progressive_prune(a, seed, manifold=manifold, samples_per_class=samples))
    seconds = time.perf_counter() - started
    removed = plan.cumulative_params_removed()
    k = plan.num_noncritical
    points = {"noncritical": k}
    if removed[-1] / plan.params_total >= TARGET:
        points["half"] = next(m for m, r in enumerate(removed) if r >= TARGET * plan.params_total)
    replays = {}
    for name, steps in points.items():
        for rec in ("none", "least_squares"):
            replays[f"{name}/{rec}"] = deployed(a, plan, steps, manifold, rec)
        if replays[f"{name}/least_squares"].get("held_out_fits"):  # the plain re-fit differs: measure it too
            with plain_least_squares():
                replays[f"{name}/least_squares_plain"] = deployed(a, plan, steps, manifold, "least_squares")
    counts = plan.category_counts()
    return {"rule": rule, "samples_per_class": samples, "seed": seed, "analysis_seconds": round(seconds, 1),
            **{c: counts.get(c, 0) for c in CATEGORIES}, "noncritical_units": k,
            "noncritical_params_ratio": removed[k] / plan.params_total, "replays": replays,
            "power": baseline_power(a, manifold, samples), "plan": plan.to_json()}


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)


def _wanted(path: Path, redo_planless: bool) -> bool:
    """Whether to (re)compute a result: absent, or (with --redo-planless) written before the
    plan was cached beside it."""
    return not path.is_file() or (redo_planless and "plan" not in json.loads(path.read_text()))


def run_model(model: str, rules, samples, seeds, work: Path, redo_planless: bool = False) -> None:
    analysis = load_analysis(model)
    unpruned = work / model / "unpruned.json"
    if not unpruned.is_file():
        _write(unpruned, {"accuracy": analysis.task.evaluate(analysis.model, analysis.device)[analysis.task.metric],
                          "units": analysis.units.num_units})
    for seed in seeds:
        for m in samples:
            for rule in rules:
                path = work / model / f"{rule.replace(':', '_')}-m{m}-seed{seed}.json"
                if _wanted(path, redo_planless):
                    _write(path, run_one(analysis, rule, m, seed))
                print(f"{model} {rule} M_k={m} seed {seed}: done", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="demo,resnet20_w8")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--samples", default=",".join(map(str, SAMPLES)))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("runs/power_benchmark"))
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--redo-planless", action="store_true", help="recompute results cached without their plan")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if not args.report_only:
        for model in args.models.split(","):
            run_model(model, args.rules.split(","), [int(m) for m in args.samples.split(",")], range(args.seeds),
                      args.work, args.redo_planless)
    from benchmarks.power_report import write_report

    print(write_report(args.work, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
