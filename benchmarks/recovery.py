"""Recovery after removal and compensated cuts, measured (issue #16), and the order of the
critical tail (issue #27): which criterion, cut, tail order and repair keep a physically
smaller model accurate without training.

    python benchmarks/recovery.py                      # every model, 3 seeds on the demo, 1 elsewhere
    python benchmarks/recovery.py --models demo --seeds 3
    python benchmarks/recovery.py --quick              # demo only, 1 seed, 5 criteria: minutes
    python benchmarks/recovery.py --models digits_cnn,fmnist_cnn,mobilenetv2 --seeds 3 --recoveries least_squares \
        --criteria "cswap absolute per_param floor25 bottlenecks,cswap absolute per_param,magnitude,amp per_param" \
        --work runs/tail_order_benchmark --report tail_order   # docs/results/tail_order.md (the default first)

For every model, criterion (C-SWAP's paper rule, `effect: absolute`, `intervention: mean`,
`intervention: least_squares`; AMP with and without the compensated cut; C-BP, magnitude,
DeepLIFT, integrated gradients, random) and seed, one plan. The labels of TAILS reorder the
kept (critical) tail of a cached C-SWAP or AMP plan (`per_param`: harm per parameter, the
default before issue #27; `thinning`: harm per parameter grown as a layer thins; `floor25`:
no layer below a quarter of its width, at least 2 units, until every other unit is taken;
`bottlenecks`: floor and thinning on the probed bottleneck layers only, as the options do,
else on every layer; `per_param floor25 bottlenecks` is the default since issue #27;
cswap/tail_order.py), so they cost no analysis. Every plan is replayed at `--ratios` of the
parameters under every recovery (none, bias, bn, least_squares, least_squares+bn; `bias` is
left out for plans whose cut already folded the mean). Accuracy on the held-out split, SAUCE,
the layer left narrowest, the non-critical operating point of the C-SWAP rows, analysis time
beside recovery time, and the largest Gram matrix a least-squares solve held. Calibration is
the seed's S (the task's manifold split), never the evaluation data.

Resumable: each plan, each (plan, recovery) curve and each replayed prefix (shared by the tail
orders of one analysis) is cached under --work and skipped when present (unless --force); the
report is rebuilt from the caches every time, into docs/results/<--report>.md, .json, .csv and
<--report>/<model>.png.

Data: the demo ships with the package; the Fashion-MNIST models read the full Fashion-MNIST
locally (`apt-get install dataset-fashion-mnist`, or CSWAP_FASHION_MNIST=DIR, see
benchmarks/datasets.py) and their checkpoints in benchmarks/checkpoints/ (the commands that
trained them are in their .json sidecars); `digits_cnn` needs scikit-learn (`pip install
scikit-learn`: its wheel holds the digits) and `fmnist_cnn` Fashion-MNIST, both trained once by
benchmarks/small_cnns.py (seeded, a minute or so; cached in benchmarks/checkpoints/); the
segmentation model (`ddrnet_scenes`, mIoU) needs its scenes and checkpoint made first by
`python benchmarks/segmentation_fashion_scenes.py --train-only` (about 20 min on one CPU
thread). Timings are from one process on a shared 2-core machine: compare them within a run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.chdir(REPO_ROOT)

import torch  # noqa: E402

SMALL_CNNS = "benchmarks/small_cnns.py"  # built (and trained once, cached) by that script
MODELS = {  # name -> packaged config ("demo"), a file of configs/, or SMALL_CNNS
    "demo": "demo",
    "resnet20_w8": "configs/fashion_mnist_resnet20_w8.yaml",
    "mobilenetv2": "configs/fashion_mnist_mobilenetv2.yaml",
    "resnet20_w32": "configs/fashion_mnist_resnet20_w32.yaml",
    "vit_p7_d128": "configs/fashion_mnist_vit_p7_d128.yaml",
    # written by `python benchmarks/segmentation_fashion_scenes.py --train-only` (scenes + training)
    "ddrnet_scenes": "runs/seg_fashion_scenes/config.yaml",
    # two held-out CNNs with a flattened last convolution (issue #27): benchmarks/small_cnns.py
    "digits_cnn": SMALL_CNNS,
    "fmnist_cnn": SMALL_CNNS,
}
CRITERION_OPTIONS = {"ddrnet_scenes": {"amp": {"metric": "mean_sigma"}}}  # AMP's KL needs per-image logits
# label -> (criterion, pruning options, test options)
EFFECT = {"critical_order": "effect"}  # the paper's tail order (the default before per_param won here)
RELATIVE = {"effect": "relative"}  # the paper's Definition 1 (the default before absolute won here)
THINNING = "effect_per_param_thinning"
CRITERIA = {  # the analyses: every label here runs its criterion once per seed
    "cswap (paper)": ("cswap", EFFECT, RELATIVE),
    "cswap absolute": ("cswap", EFFECT, {"effect": "absolute"}),
    "cswap mean": ("cswap", {"intervention": "mean", **EFFECT}, RELATIVE),
    "cswap least_squares": ("cswap", {"intervention": "least_squares", **EFFECT}, RELATIVE),
    "amp": ("amp", EFFECT, {}),
    "amp least_squares": ("amp", {"intervention": "least_squares", **EFFECT}, {}),
    "cbp": ("cbp", {}, RELATIVE),
    "magnitude": ("magnitude", {}, {}),
    "deeplift": ("deeplift", {}, {}),
    "integrated_gradients": ("integrated_gradients", {}, {}),
    "random": ("random", {}, {}),
}
# the same analysis with only the kept tail ordered differently (cswap/tail_order.py): label ->
# (the label whose cached plan it reorders, critical_order, order_tail's other arguments). The
# walk never reads the tail order (tests/test_tail_order.py), so no analysis is run again.
FLOOR_25 = {"floor": (0.25, 2)}  # a quarter of each layer's width, at least 2 units
FLOOR_50 = {"floor": (0.5, 2)}
EVERY = {"every_layer": True}  # floor and thinning on every layer, not only on bottlenecks (the first try)
TAILS = {
    "cswap per_param": ("cswap (paper)", "effect_per_param", {}),
    "cswap absolute per_param": ("cswap absolute", "effect_per_param", {}),  # the default before issue #27
    "cswap absolute per_param floor25": ("cswap absolute", "effect_per_param", {**FLOOR_25, **EVERY}),
    "cswap absolute per_param floor50": ("cswap absolute", "effect_per_param", {**FLOOR_50, **EVERY}),
    "cswap absolute thinning": ("cswap absolute", THINNING, {"thinning_power": 1.0, **EVERY}),
    "cswap absolute thinning2": ("cswap absolute", THINNING, {"thinning_power": 2.0, **EVERY}),
    "cswap absolute thinning floor25": ("cswap absolute", THINNING, {"thinning_power": 1.0, **FLOOR_25, **EVERY}),
    # the default since issue #27 (critical_order effect_per_param_thinning, min_width 0.25 / 2, on the probed
    # bottlenecks), and its two halves, each an option: the floor alone, the thinning alone
    "cswap absolute thinning floor25 bottlenecks": ("cswap absolute", THINNING, {"thinning_power": 1.0, **FLOOR_25}),
    "cswap absolute per_param floor25 bottlenecks": ("cswap absolute", "effect_per_param", FLOOR_25),
    "cswap absolute thinning bottlenecks": ("cswap absolute", THINNING, {"thinning_power": 1.0}),
    "cswap least_squares per_param": ("cswap least_squares", "effect_per_param", {}),
    "amp per_param": ("amp", "effect_per_param", {}),
    "amp thinning floor25": ("amp", THINNING, {"thinning_power": 1.0, **FLOOR_25, **EVERY}),
    "amp thinning floor25 bottlenecks": ("amp", THINNING, {"thinning_power": 1.0, **FLOOR_25}),
    "amp per_param floor25 bottlenecks": ("amp", "effect_per_param", FLOOR_25),
}
RECOVERIES = ("none", "bias", "bn", "least_squares", "least_squares+bn")
RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def load_analysis(model: str):
    from cswap.build import analysis_from_config
    from cswap.config import load_config
    from cswap.packaged import config_argument

    if MODELS[model] == SMALL_CNNS:
        from benchmarks.small_cnns import analysis

        return analysis(model)
    if model != "demo":
        from benchmarks.datasets import fashion_mnist_root

        fashion_mnist_root()  # stops at once with the setup hint when the data is missing
    if not Path(config_argument(MODELS[model])).is_file():
        raise SystemExit(f"{MODELS[model]} is missing: run `OMP_NUM_THREADS=1 python "
                         "benchmarks/segmentation_fashion_scenes.py --train-only` first (about 20 min)")
    cfg = load_config(config_argument(MODELS[model]), [])
    analysis, _ = analysis_from_config(cfg)
    return analysis


def variant(analysis, pruning: dict, test: dict):
    """The analysis with the criterion's pruning and test options."""
    from cswap import registry

    a = analysis
    if test:
        a = replace(a, test=registry.create("tests", "paired_t", {**a.test.options.model_dump(), **test}))
    if pruning:
        a = replace(a, options=a.options.model_copy(update=pruning))
    return a


def make_plan(analysis, label: str, seed: int, path: Path, options: dict | None = None) -> dict:
    """The criterion's plan for this seed (cached at `path`) and its analysis time; a label of
    TAILS reorders the (cached, else made) plan of its analysis."""
    from cswap import registry
    from cswap.plan import PruningPlan

    if path.is_file():
        return json.loads(path.read_text())
    if label in TAILS:
        base, order, kwargs = TAILS[label]
        base_path = path.with_name(path.name.replace(_stem(label), _stem(base), 1))
        return _reordered(analysis, make_plan(analysis, base, seed, base_path, options), label, order, kwargs, path)
    name, pruning, test = CRITERIA[label]
    a = variant(analysis, pruning, test)
    started = time.perf_counter()
    ranking = registry.create("criteria", name, (options or {}).get(name)).rank(a, seed)
    plan = PruningPlan.from_ranking(a.model, a.units, ranking, adapter=a.adapter_name)
    record = {"label": label, "seconds": time.perf_counter() - started, "plan": plan.to_json()}
    _write(path, record)
    return record


def _stem(label: str) -> str:
    return label.replace(" ", "_")


def _reordered(analysis, record: dict, label: str, order: str, kwargs: dict, path: Path) -> dict:
    """A cached plan with its kept tail put in `order` (C-SWAP's harm is -xi, AMP's its score)."""
    from cswap.plan import PruningPlan
    from cswap.options import MinWidth
    from cswap.tail_order import order_tail

    started = time.perf_counter()
    plan = PruningPlan.from_json(record["plan"])
    head, tail = plan.steps[:plan.num_noncritical], plan.steps[plan.num_noncritical:]
    harm = (lambda s: -s.xi) if plan.method == "cswap" else (lambda s: s.score)
    args = {k: v for k, v in kwargs.items() if k != "every_layer"}
    if "floor" in kwargs:
        args["floor"] = MinWidth(share=kwargs["floor"][0], minimum=kwargs["floor"][1])
    if kwargs.get("every_layer"):
        args["bottlenecks"] = [layer.name for layer in analysis.units.layers]
    meta = {**plan.meta, "critical_order": order, **{f"tail_{k}": v for k, v in kwargs.items()}}
    steps = head + order_tail(analysis.model, analysis.units, head, tail, harm, order, **args)
    new = PruningPlan.build(analysis.model, analysis.units, steps, method=plan.method, adapter=plan.adapter,
                            meta=meta, protected=plan.protected)
    out = {"label": label, "seconds": record["seconds"] + time.perf_counter() - started, "plan": new.to_json(),
           "derived_from": "the cached plan of the same walk, tail reordered"}
    _write(path, out)
    return out


def replay_at_ratios(analysis, plan, seed: int, recovery: str, ratios, cache: Path | None = None) -> dict:
    """Accuracy of the plan replayed (compensated as it was analysed) and repaired by
    `recovery` at each reachable ratio, with the time recovery took at each and the layer
    left narrowest (share of its width). `cache`: a folder of replays by their exact unit
    prefix, which plans of one analysis with different tail orders share."""
    a, metric = analysis, analysis.task.metric
    sample_set = a.task.manifold(seed)
    from cswap.options import Target
    from cswap.replay import steps_for

    target = Target(recovery=recovery)
    removed = plan.cumulative_params_removed()
    reachable = removed[-1] / plan.params_total
    targets = [r for r in ratios if r <= reachable + 1e-12] + ([reachable] if ratios[-1] > reachable else [])
    rows = []
    for r in targets:
        k = len(plan.steps) if r == reachable else steps_for(plan, a.model, Target(params_ratio=r), a.adapter)[0]
        value, seconds = _replayed(a, plan, k, sample_set, target, cache)
        rows.append({"target": round(float(r), 4), "params_ratio": removed[k] / plan.params_total, "steps": k,
                     metric: value, "recovery_seconds": round(seconds, 4), "narrowest": narrowest(plan, k)})
    noncritical = None
    if plan.num_noncritical:  # the paper's operating point: every non-critical unit, no target
        k = plan.num_noncritical
        noncritical = {"params_ratio": removed[k] / plan.params_total,
                       metric: _replayed(a, plan, k, sample_set, target, cache)[0]}
    return {"rows": rows, "noncritical": noncritical}


def _replayed(a, plan, k: int, sample_set, target, cache: Path | None) -> tuple[float, float]:
    """The metric of the plan's first k steps replayed and repaired, and recovery's seconds;
    read from `cache` when the same prefix was replayed for another tail order."""
    import hashlib

    from cswap.replay import ReplayData, replay_steps

    key = hashlib.sha256(json.dumps([str(s.unit) for s in plan.steps[:k]]).encode()).hexdigest()[:24]
    path = cache / f"{key}.json" if cache else None
    if path is not None and path.is_file():
        hit = json.loads(path.read_text())
        return hit["metric"], hit["recovery_seconds"]
    out = replay_steps(plan, a.model, k, target, ReplayData(sample_set, sample_set), adapter=a.adapter, graph=a.units)
    result = (a.task.evaluate(out.model, a.device)[a.task.metric], out.recovery.seconds if out.recovery else 0.0)
    if path is not None:
        _write(path, {"metric": result[0], "recovery_seconds": result[1], "steps": k})
    return result


def narrowest(plan, k: int) -> list:
    """[layer, width before, width after] of the layer the first k steps leave with the
    smallest share of its width (the bottleneck issue #27 is about)."""
    from cswap.tail_order import widths_after

    after = widths_after(plan.layers, (s.unit.layer for s in plan.steps[:k]))
    name = min(plan.layers, key=lambda n: (after[n] / plan.layers[n], n))
    return [name, plan.layers[name], after[name]]


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)


def run_model(model: str, criteria, seeds, recoveries, ratios, work: Path, force: bool) -> None:
    from cswap.plan import PruningPlan

    analysis = load_analysis(model)
    unpruned_path = work / model / "unpruned.json"
    if force or not unpruned_path.is_file():
        _write(unpruned_path, {analysis.task.metric: analysis.task.evaluate(analysis.model, analysis.device)
                               [analysis.task.metric], "params": sum(p.numel() for p in analysis.model.parameters()),
                               "largest_gram": largest_gram(analysis)})
    for label in criteria:
        for seed in seeds:
            stem = work / model / f"{_stem(label)}-seed{seed}"
            if force:
                for old in stem.parent.glob(stem.name + "*"):
                    old.unlink()
            record = make_plan(analysis, label, seed, stem.with_suffix(".plan.json"), CRITERION_OPTIONS.get(model))
            plan = PruningPlan.from_json(record["plan"])
            for recovery in recoveries:
                if recovery.startswith("bias") and plan.compensated:
                    continue  # the cut already folded the mean
                path = Path(f"{stem}-{recovery}.json")
                if not path.is_file():
                    started = time.perf_counter()
                    cache = work / model / "replays" / f"{_stem(TAILS.get(label, (label,))[0])}-seed{seed}-{recovery}"
                    result = replay_at_ratios(analysis, plan, seed, recovery, ratios, cache)
                    _write(path, {**result, "seconds": time.perf_counter() - started})
                print(f"{model} {label} seed {seed} {recovery}: done", flush=True)


def largest_gram(analysis) -> dict:
    """The widest input a least-squares solve sees (a reader's kept columns, k*k per channel
    of a convolution, plus the bias column): the memory a Gram matrix and its inverse hold."""
    from torch import nn

    widest = max((m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d)
                  else m.in_features, name) for name, m in analysis.model.named_modules()
                 if isinstance(m, (nn.Conv2d, nn.Linear)))
    columns = widest[0] + 1
    return {"module": widest[1], "columns": columns, "bytes_float64": 2 * columns * columns * 8}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--criteria", default=",".join(CRITERIA), help="labels of CRITERIA or TAILS, comma-separated")
    p.add_argument("--recoveries", default=",".join(RECOVERIES))
    p.add_argument("--seeds", type=int, default=None, help="seeds per model (default: 3 on the demo, 1 elsewhere)")
    p.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    p.add_argument("--work", type=Path, default=Path("runs/recovery_benchmark"))
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--quick", action="store_true", help="demo, 1 seed, 5 criteria, 3 recoveries")
    p.add_argument("--report", default="recovery", help="name of the report: docs/results/<name>.md, with "
                   "benchmarks/<name>_notes.md appended (tail_order: the tail-order benchmark of issue #27)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.models, args.seeds, args.recoveries = "demo", 1, "none,bn,least_squares"
        args.criteria = "cswap (paper),cswap per_param,cswap least_squares,amp,magnitude"
    ratios = tuple(float(r) for r in args.ratios.split(","))
    criteria = [c.strip() for c in args.criteria.split(",")]
    unknown = [c for c in criteria if c not in CRITERIA and c not in TAILS]
    if unknown:
        p.error(f"unknown criteria {unknown}; known: {', '.join([*CRITERIA, *TAILS])}")
    if not args.report_only:
        for model in args.models.split(","):
            seeds = range(args.seeds if args.seeds else (3 if model == "demo" else 1))
            run_model(model, criteria, list(seeds), args.recoveries.split(","), ratios, args.work, args.force)
    from benchmarks.recovery_report import write_report

    print(write_report(args.work, args.out, args.report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
