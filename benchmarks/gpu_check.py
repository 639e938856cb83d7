"""GPU check (issue #18): correctness, speed and reduced precision of C-SWAP on one CUDA device.

On a machine with a GPU, from a checkout (the package installed or not), one command:

    python benchmarks/gpu_check.py                 # about 5-8 minutes on one H100/H200

    python benchmarks/gpu_check.py --smoke         # the same code on CPU, tiny sizes, seconds
                                                   # (tests/test_gpu_check.py runs it by default)

Nothing is downloaded: the models have random weights (BatchNorm statistics taken from one
random batch, so activations are O(1)) and S is random 3x32x32 images with balanced labels.
Timings and memory do not depend on the weights; the plans' categories mean nothing about a
trained network, but plans can be compared bit for bit. It writes docs/results/gpu/ (or
--out): correctness.json, timing.json, precision.json and summary.md (a short table).

What to compare:
  * correctness.json: every `ok` true. Cut == removal (fp32 on the device, float64 on the
    device) for ResNet-18 (CIFAR stem), MobileNetV2 and DeiT-tiny; staged trial scores bitwise
    equal to whole forward passes; the staged plan byte-identical to the naive (engine full)
    plan on a subset of layers; `unit_batch: auto` and a fixed k give the plan of k = 1; a
    real CUDA out-of-memory (most of the free memory taken by a ballast tensor, then 64 units
    asked per pass) halves the units per pass and ends with the plan of k = 1.
  * timing.json: ResNet-18 (CIFAR stem), 3x32x32, 10 classes, M_k = 128 (1,280 images). The
    naive reference is timed on a subset of layers; its cost per unit is one whole forward of
    S whatever the layer, so its time for all layers is estimated as seconds per unit x units.
    Then `staged` and `staged + unit_batch auto` on every layer: wall time, units/s, peak GPU
    memory. Target: the whole analysis under 5 minutes on one H100/H200.
  * precision.json: the staged analysis with `precision: tf32` and `bf16` beside fp32 (TF32
    disabled for the fp32 runs, since torch allows it in cuDNN convolutions by default):
    categories equal, order equal, max |delta xi|, units whose category changed.
On CPU (--smoke) the real out-of-memory, TF32 and `unit_batch: auto` (1 off CUDA) are skipped,
each with a note in the JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # removal_check: the cut == removal check the test suite uses

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from cswap.build import analysis_for  # noqa: E402
from cswap.interfaces import Analysis, UnitGraph  # noqa: E402
from cswap.options import AnalysisOptions  # noqa: E402
from cswap.plan import PruningPlan  # noqa: E402
from cswap.precision import tf32_allowed  # noqa: E402
from cswap.pruner import progressive_prune  # noqa: E402
from cswap.pruner.trials import Trials  # noqa: E402
from cswap.tasks.classification import ClassificationTask  # noqa: E402
from removal_check import check_cut_equals_removal, prepare  # noqa: E402

CLASSES = 10


@dataclass
class Sizes:
    """Everything the GPU run and the CPU smoke run differ in."""

    device: str
    samples_per_class: int  # M_k
    image: int  # side of the 3 x image x image inputs of the timing model
    timing_model: Callable[[], nn.Module]
    zoo: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]]  # cut == removal models and their inputs
    naive_layers: int  # layers the naive reference runs on
    fixed_k: int


def _resnet18():
    from cswap.models.cifar_resnet import resnet18_cifar

    return resnet18_cifar(num_classes=CLASSES)


def _tiny_resnet():
    from cswap.models.cifar_resnet import cifar_resnet8

    return cifar_resnet8(width=4, in_channels=3, num_classes=CLASSES)


def _mobilenet(width_mult: float, side: int):
    from torchvision.models import mobilenet_v2

    return lambda: (mobilenet_v2(num_classes=CLASSES, width_mult=width_mult), torch.randn(4, 3, side, side))


def _deit(side: int, **small):
    import timm

    return lambda: (timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=CLASSES, img_size=side,
                                      **small), torch.randn(4, 3, side, side))


GPU = Sizes("cuda", 128, 32, _resnet18, {
    "resnet18_cifar": lambda: (_resnet18(), torch.randn(8, 3, 32, 32)),
    "mobilenet_v2": _mobilenet(1.0, 32),
    "deit_tiny": _deit(224)}, naive_layers=3, fixed_k=4)
SMOKE = Sizes("cpu", 2, 16, _tiny_resnet, {
    "resnet18_cifar (smoke: CIFAR ResNet-8, width 4)": lambda: (_tiny_resnet(), torch.randn(4, 3, 16, 16)),
    "mobilenet_v2 (smoke: width 0.25)": _mobilenet(0.25, 32),
    "deit_tiny (smoke: 32 px, patch 8, 2 blocks)": _deit(32, patch_size=8, depth=2)}, naive_layers=2, fixed_k=3)


# ---- helpers ------------------------------------------------------------------------------
def random_task(sizes: Sizes) -> ClassificationTask:
    """S: M_k random 3 x side x side images of each of 10 classes (seeded)."""
    g = torch.Generator().manual_seed(0)
    n = sizes.samples_per_class * CLASSES
    x = torch.randn(n, 3, sizes.image, sizes.image, generator=g)
    y = torch.arange(CLASSES).repeat(sizes.samples_per_class)
    return ClassificationTask.from_tensors(x, y, sizes.samples_per_class)


def timing_model(sizes: Sizes) -> nn.Module:
    torch.manual_seed(0)
    return prepare(sizes.timing_model(), torch.randn(64, 3, sizes.image, sizes.image)).to(sizes.device)


def subset(analysis: Analysis, count: int) -> Analysis:
    """The analysis restricted to `count` layers spread over the depth (first and last included)."""
    layers = analysis.units.layers
    idx = sorted({round(i) for i in np.linspace(0, len(layers) - 1, min(count, len(layers)))})
    graph = UnitGraph([layers[i] for i in idx], analysis.units.skipped, analysis.units.input_shape,
                      analysis.units.unverified)
    return dataclasses.replace(analysis, units=graph)


def run_analysis(analysis: Analysis, **options) -> tuple[PruningPlan, dict]:
    """Progressive C-SWAP with `options` changed: the plan, wall time, units/s, peak GPU memory."""
    a = dataclasses.replace(analysis, options=analysis.options.model_copy(update=options))
    cuda = a.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    plan = PruningPlan.from_ranking(a.model, a.units, progressive_prune(a, 0), adapter=a.adapter_name)
    seconds = time.perf_counter() - started
    units = plan.meta["units_tested"]
    return plan, {"seconds": round(seconds, 3), "units_tested": units, "units_per_s": round(units / seconds, 2),
                  "gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
                  "categories": plan.category_counts(), "options": options}


def same_plan(a: PruningPlan, b: PruningPlan) -> bool:
    return json.dumps(a.to_json(), sort_keys=True) == json.dumps(b.to_json(), sort_keys=True)


# ---- correctness ----------------------------------------------------------------------------
def cut_equals_removal(sizes: Sizes) -> dict:
    """Per model: units removed through the plan vs cut (tests/removal_check.py), on the device."""
    out = {}
    for name, build in sizes.zoo.items():
        torch.manual_seed(0)
        model, x = build()
        model = prepare(model, torch.randn_like(x)).to(sizes.device)
        started = time.perf_counter()
        try:
            with tf32_allowed(False):
                numbers = check_cut_equals_removal(model, x.to(sizes.device), per_layer=2, max_layers=6, verify=True)
            out[name] = {"ok": True, **{k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in numbers.items()}}
        except AssertionError as exc:
            out[name] = {"ok": False, "error": str(exc).splitlines()[0][:300]}
        out[name]["seconds"] = round(time.perf_counter() - started, 2)
        del model
    return out


def staged_scores_equal_full(analysis: Analysis, units_per_layer: int = 2) -> dict:
    """Trial scores of a few units of every layer: staged engine vs whole forward passes, bitwise."""
    manifold = analysis.task.manifold(0)
    trials = {kind: Trials(dataclasses.replace(analysis, options=analysis.options.model_copy(update={"engine": kind})),
                           manifold) for kind in ("full", "staged")}
    engines = {kind: t.engine.kind for kind, t in trials.items()}
    units = [u for layer in analysis.units.layers for u in layer.units()[:units_per_layer]]
    differing = [str(u) for u in units
                 if not np.array_equal(trials["full"].trial([u], None)[0].values, trials["staged"].trial([u], None)[0].values)]
    return {"ok": not differing and engines == {"full": "full", "staged": "staged"}, "units": len(units),
            "differing": differing[:10], "engines": engines}


def unit_batches_same_plan(analysis: Analysis, sizes: Sizes, reference: PruningPlan) -> dict:
    """`unit_batch: auto` and a fixed k against the k = 1 plan `reference`, on the same layers."""
    out = {}
    for k in ("auto", sizes.fixed_k):
        plan, timing = run_analysis(analysis, engine="staged", unit_batch=k)
        out[f"unit_batch_{k}"] = {"ok": same_plan(plan, reference), **timing}
    if sizes.device != "cuda":
        out["note"] = "off CUDA unit_batch auto is 1 (no gain on a CPU): it is the k = 1 plan by construction"
    return out


def real_out_of_memory(analysis: Analysis, reference: PruningPlan, peak_mb: float) -> dict:
    """A ballast tensor takes the free GPU memory but twice what the k = 1 run peaked at;
    64 units per pass then cannot fit: the batch must halve and the plan be the k = 1 plan."""
    import logging

    torch.cuda.empty_cache()  # memory cached by torch's allocator counts as used in mem_get_info
    free, _ = torch.cuda.mem_get_info()
    leave = int(2 * peak_mb * 2**20) + (64 << 20)
    ballast = torch.empty(max(0, free - leave), dtype=torch.uint8, device="cuda")
    lines: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("cswap").addHandler(handler)
    try:
        plan, timing = run_analysis(analysis, engine="staged", unit_batch=64)
    finally:
        logging.getLogger("cswap").removeHandler(handler)
        del ballast
        torch.cuda.empty_cache()
    halvings = [line for line in lines if "out of memory" in line]
    return {"ok": bool(halvings) and same_plan(plan, reference), "left_free_mb": round(leave / 2**20),
            "halvings": halvings[:8], **timing}


# ---- timing and precision -------------------------------------------------------------------
def timing(analysis: Analysis, sizes: Sizes) -> tuple[dict, dict[str, PruningPlan]]:
    """Naive reference on a subset of layers (and staged there: the same plan, bit for bit), then
    staged and staged + unit_batch auto on every layer."""
    few = subset(analysis, sizes.naive_layers)
    naive_plan, naive = run_analysis(few, engine="full")
    staged_few_plan, staged_few = run_analysis(few, engine="staged")
    staged_plan, staged = run_analysis(analysis, engine="staged")
    auto_plan, auto = run_analysis(analysis, engine="staged", unit_batch="auto")
    per_unit = naive["seconds"] / max(1, naive["units_tested"])
    estimate = per_unit * staged["units_tested"]
    result = {
        "naive_subset": {"layers": [layer.name for layer in few.units.layers], **naive},
        "staged_subset": {**staged_few, "plan_identical_to_naive": same_plan(staged_few_plan, naive_plan)},
        "staged": staged, "staged_unit_batch_auto": {**auto, "plan_identical_to_staged": same_plan(auto_plan, staged_plan)},
        "naive_all_layers_estimate_s": round(estimate, 1),
        "speedup_staged_vs_naive_estimate": round(estimate / staged["seconds"], 2),
        "speedup_auto_vs_naive_estimate": round(estimate / auto["seconds"], 2),
    }
    return result, {"staged": staged_plan, "naive_subset": naive_plan, "staged_subset": staged_few_plan}


def compare_plans(test: PruningPlan, exact: PruningPlan) -> dict:
    """Reduced-precision plan vs the fp32 one: categories per unit, order of the steps, xi."""
    cat = {s.unit: s.category for s in exact.steps}
    xi = {s.unit: s.xi for s in exact.steps}
    changed = [str(s.unit) for s in test.steps if cat.get(s.unit) != s.category]
    dxi = [abs(s.xi - xi[s.unit]) for s in test.steps if s.xi is not None and xi.get(s.unit) is not None]
    return {"categories_equal": not changed, "order_equal": [s.unit for s in test.steps] == [s.unit for s in exact.steps],
            "category_changes": len(changed), "changed_units": changed[:10],
            "max_abs_delta_xi": float(f"{max(dxi, default=0.0):.3g}"),
            "median_abs_xi": float(f"{np.median([abs(v) for v in xi.values() if v is not None]):.3g}")}


def precision(analysis: Analysis, sizes: Sizes, exact: PruningPlan, unit_batch) -> dict:
    """tf32 (CUDA only) and bf16 trials beside the fp32 plan `exact` of the same analysis."""
    out = {}
    for mode in ("tf32", "bf16"):
        if mode == "tf32" and sizes.device != "cuda":
            out[mode] = {"skipped": "TF32 exists on CUDA only (refused on CPU by cswap.precision)"}
            continue
        plan, timing_ = run_analysis(analysis, engine="staged", unit_batch=unit_batch, precision=mode)
        out[mode] = {**compare_plans(plan, exact), **timing_, "meta_precision": plan.meta.get("precision")}
    return out


# ---- the run --------------------------------------------------------------------------------
def environment(sizes: Sizes) -> dict:
    cuda = sizes.device == "cuda"
    return {"device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "torch_default_tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                                   "cudnn": torch.backends.cudnn.allow_tf32},
            "weights": "random (BatchNorm statistics from one random batch); S random images, balanced labels",
            "samples_per_class": sizes.samples_per_class, "input": [3, sizes.image, sizes.image]}


def check(sizes: Sizes, out: Path) -> dict:
    """Every part, each written as soon as it is done (a run stopped by its time limit keeps them)."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    env = environment(sizes)
    with tf32_allowed(False):
        correctness = {"cut_equals_removal": cut_equals_removal(sizes)}
        model = timing_model(sizes)
        analysis = analysis_for(model, random_task(sizes), device=sizes.device,
                                options=AnalysisOptions(verify_units=False), example_inputs=torch.zeros(1, 3, sizes.image, sizes.image))
        env["units"], env["layers"] = analysis.units.num_units, len(analysis.units.layers)
        correctness["staged_scores_equal_full"] = staged_scores_equal_full(subset(analysis, sizes.naive_layers))
        _write(out / "correctness.json", {"environment": env, **correctness})
        times, plans = timing(analysis, sizes)
        correctness["staged_plan_equals_naive"] = {"ok": times["staged_subset"]["plan_identical_to_naive"]}
        _write(out / "timing.json", {"environment": env, **times})
        few = subset(analysis, sizes.naive_layers)
        correctness["unit_batch"] = unit_batches_same_plan(few, sizes, plans["staged_subset"])
        if sizes.device == "cuda":
            correctness["out_of_memory"] = real_out_of_memory(few, plans["staged_subset"],
                                                              times["staged_subset"]["gpu_peak_mb"])
        else:
            correctness["out_of_memory"] = {"skipped": "a real out-of-memory needs CUDA; tests/test_engine.py "
                                            "covers the halving with a simulated one"}
        _write(out / "correctness.json", {"environment": env, **correctness})
        prec = precision(analysis, sizes, plans["staged"], "auto")
        _write(out / "precision.json", {"environment": env, "reference": "fp32 staged plan", **prec})
    env["total_seconds"] = round(time.perf_counter() - started, 1)
    result = {"environment": env, "correctness": correctness, "timing": times, "precision": prec}
    (out / "summary.md").write_text(summary(result))
    _write(out / "timing.json", {"environment": env, **times})
    return result


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="the same code on CPU with tiny sizes (seconds)")
    p.add_argument("--out", type=Path, help="folder for the JSON and summary.md (default docs/results/gpu, "
                   "or docs/results/gpu/smoke with --smoke)")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device visible to torch; run with --smoke for the CPU check", file=sys.stderr)
        return 2
    sizes = SMOKE if args.smoke else GPU
    out = args.out or REPO / "docs/results/gpu" / ("smoke" if args.smoke else "")
    result = check(sizes, out)
    print(summary(result))
    return 0 if all_ok(result["correctness"]) else 1


def all_ok(correctness: dict) -> bool:
    """Every `ok` in the correctness section true (skipped parts have none)."""
    oks = []

    def walk(d):
        for k, v in d.items():
            if k == "ok":
                oks.append(v)
            elif isinstance(v, dict):
                walk(v)
    walk(correctness)
    return bool(oks) and all(oks)


def summary(result: dict) -> str:
    """The short markdown table of summary.md."""
    env, c, t, p = result["environment"], result["correctness"], result["timing"], result["precision"]
    ok = lambda d: ("yes" if d["ok"] else "**NO**") if "ok" in d else "skipped"  # noqa: E731
    rows = [f"# GPU check: {env['device']}, torch {env['torch']}", "",
            f"ResNet-18 (CIFAR stem), 3x{env['input'][1]}x{env['input'][2]}, {CLASSES} classes, "
            f"M_k = {env['samples_per_class']}, {env['units']} units in {env['layers']} layers; {env['weights']}. "
            f"Total {env['total_seconds']} s.", "", "| check | passed |", "|---|---|"]
    rows += [f"| cut == removal, {name} | {ok(d)} |" for name, d in c["cut_equals_removal"].items()]
    rows += [f"| staged trial scores bitwise = whole forwards ({c['staged_scores_equal_full']['units']} units) | "
             f"{ok(c['staged_scores_equal_full'])} |",
             f"| staged plan = naive plan ({len(t['naive_subset']['layers'])} layers) | {ok(c['staged_plan_equals_naive'])} |"]
    rows += [f"| {k.replace('_', ' ')} plan = k 1 plan | {ok(d)} |" for k, d in c["unit_batch"].items() if k != "note"]
    rows += [f"| real out-of-memory halves and carries on | {ok(c['out_of_memory'])} |", "",
             "| analysis | wall s | units/s | GPU peak MB |", "|---|---|---|---|"]
    timed = [("naive (engine full), subset", t["naive_subset"]), ("staged, subset", t["staged_subset"]),
             ("staged, all layers", t["staged"]), ("staged + unit_batch auto, all layers", t["staged_unit_batch_auto"])]
    rows += [f"| {name} | {d['seconds']} | {d['units_per_s']} | {d['gpu_peak_mb']} |" for name, d in timed]
    rows += ["", f"Naive reference on all layers, estimated (seconds per unit x units): "
             f"{t['naive_all_layers_estimate_s']} s: staged x{t['speedup_staged_vs_naive_estimate']}, "
             f"staged + auto x{t['speedup_auto_vs_naive_estimate']}.", "",
             "| trials in | wall s | categories equal | order equal | changes | max abs delta xi |", "|---|---|---|---|---|---|"]
    for mode, d in p.items():
        rows.append(f"| {mode} | skipped: {d['skipped']} |  |  |  |  |" if "skipped" in d else
                    f"| {mode} | {d['seconds']} | {d['categories_equal']} | {d['order_equal']} | {d['category_changes']} | "
                    f"{d['max_abs_delta_xi']} (median abs xi {d['median_abs_xi']}) |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
