"""Measured speed-ups of pruned models on this CPU: a parameter target with and without
`round_to: 8`, and a latency target (`pruning.latency_ratio`), issue #18.

    python benchmarks/latency.py            # about 10 minutes on a 2-core machine
    python benchmarks/latency.py --quick    # fewer timing rounds, the demo's S at M_k = 16

For each model a plan, then four operating points replayed from it: the original; the shortest
prefix removing 50 % of the parameters; the same target replayed with every pruned width a
multiple of 8 (`Target(round_to=8)`); and the shortest prefix measured 1.5x faster at batch 1
(`cswap.latency.latency_search`: a per-layer latency table, then measurements). All points of a
model are then timed in turns (`cswap.metrics.compare_costs`, at batch 1 and 64), so machine load
hits them alike and their ratios are comparable within the run; absolute milliseconds are not.

Models: the demo ResNet-8 (its checkpoint and Fashion-MNIST subset, cswap/demo/; a C-SWAP plan of
the demo config, so accuracy is reported at every point, by the task's evaluate on the demo's eval
split); CIFAR ResNet-20 at width 16 and 64, the small MobileNetV2 and a DeiT-tiny (timm
deit_tiny_patch16_224 architecture at 1x28x28, patch 7) with random weights and a `magnitude`
plan (DeiT: a seeded random order; the magnitude criterion cannot score attention heads): their
latency does not depend on the weights. One intra-op thread (the demo config's).
Writes docs/results/latency.json and docs/results/latency.md (its "Reading" section is written by
hand after a run: a new run overwrites the file without it).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import cswap  # noqa: E402
from cswap.build import analysis_for, analysis_from_config, resolve_adapter  # noqa: E402
from cswap.demo import demo_config  # noqa: E402
from cswap.latency import LatencyTable, latency_search  # noqa: E402
from cswap.metrics import compare_costs  # noqa: E402
from cswap.options import Target  # noqa: E402
from cswap.plan import PruningPlan  # noqa: E402
from cswap.pruner import progressive_prune  # noqa: E402
from cswap.removal import count_params  # noqa: E402
from cswap.replay import adapter_of, prune, removed_model  # noqa: E402
from cswap.tasks.classification import ClassificationTask  # noqa: E402

PARAMS_RATIO, ROUND_TO, TARGET, BATCH = 0.5, 8, 1.5, 64


def demo(quick: bool):
    """The demo ResNet-8 with its checkpoint, its C-SWAP plan, and its task (for accuracy)."""
    cfg = demo_config(16 if quick else 32)
    analysis, _ = analysis_from_config(cfg)
    plan = PruningPlan.from_analysis(analysis, progressive_prune(analysis, cfg.seed))
    return analysis.model, plan, analysis.task


def random_model(build, criterion: str = "magnitude") -> tuple[nn.Module, PruningPlan, None]:
    """A random-weight 1x28x28 model and its `criterion` plan (every unit ranked)."""
    torch.manual_seed(0)
    model = build().eval()
    x, y = torch.randn(40, 1, 28, 28), torch.arange(10).repeat(4)
    ranking = cswap.registry.create("criteria", criterion).rank(
        analysis_for(model, ClassificationTask.from_tensors(x, y, 4)), 0)
    name, adapter = resolve_adapter("auto", model)
    return model, PruningPlan.from_ranking(model, adapter.units(model, x[:1]), ranking, adapter=name), None


def _resnet20(width):
    from cswap.models.cifar_resnet import cifar_resnet20

    return lambda: cifar_resnet20(width=width, in_channels=1, num_classes=10)


def _mobilenet():
    from cswap.models.small_mobilenet import fmnist_mobilenetv2

    return fmnist_mobilenetv2(num_classes=10)


def _deit():
    import timm

    return timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=28, patch_size=7,
                             in_chans=1)


MODELS = {
    "demo ResNet-8 (trained, C-SWAP plan)": demo,
    "ResNet-20 width 16 (random, magnitude)": lambda quick: random_model(_resnet20(16)),
    "ResNet-20 width 64 (random, magnitude)": lambda quick: random_model(_resnet20(64)),
    "MobileNetV2 (random, magnitude)": lambda quick: random_model(_mobilenet),
    # magnitude reads torch-pruning groups, which a ViT's attention heads are not: a seeded random order
    "DeiT-tiny 28x28 patch 7 (random, random order)": lambda quick: random_model(_deit, "random"),
}


def operating_points(model: nn.Module, plan: PruningPlan, min_seconds: float) -> dict[str, tuple[nn.Module, dict]]:
    """The pruned models of one plan, each with how it was chosen (steps, what the search measured)."""
    points = {"original": (model, {"steps": 0})}
    adapter = adapter_of(plan)
    for round_to, label in ((None, f"params {PARAMS_RATIO:.0%}"), (ROUND_TO, f"params {PARAMS_RATIO:.0%}, round_to {ROUND_TO}")):
        target = Target(params_ratio=PARAMS_RATIO, round_to=round_to, recovery="none")  # shapes: latency
        pruned = prune(plan, model, target, adapter=adapter)
        points[label] = (pruned.model, {"steps": pruned.steps})
    started = time.perf_counter()
    table = LatencyTable.measure(plan, model, 1, adapter=adapter, min_seconds=min_seconds)
    search = latency_search(plan, model, TARGET, table, adapter=adapter, min_seconds=min_seconds)
    info = {"steps": search.steps, "search": search.to_json(), "table_scale": round(table.scale, 3),
            "table_seconds": table.seconds, "search_seconds": round(time.perf_counter() - started, 1)}
    points[f"latency x{TARGET}"] = (removed_model(plan, model, search.steps, Target(), adapter), info)
    return points


def widths_aligned(plan: PruningPlan, pruned: nn.Module) -> bool | None:
    """Whether every plan layer that was pruned has a width that is a multiple of ROUND_TO."""
    widths = []
    for name, channels in plan.layers.items():
        weight = getattr(pruned.get_submodule(name), "weight", None)
        if weight is not None and weight.shape[0] != int(channels):
            widths.append(weight.shape[0])
    return None if not widths else all(w % ROUND_TO == 0 for w in widths)


def measure(name: str, quick: bool) -> dict:
    """One model: its plan, its operating points, their costs in turns, accuracy when it has a task."""
    started = time.perf_counter()
    model, plan, task = MODELS[name](quick)
    planned = time.perf_counter() - started
    points = operating_points(model, plan, 0.3 if quick else 1.0)
    x = plan.example_inputs().normal_(generator=torch.Generator().manual_seed(0))
    costs = compare_costs([m for m, _ in points.values()], x, batch=BATCH, repeats=10 if quick else 20)
    base = costs[0]
    rows = {}
    for (label, (pruned, info)), cost in zip(points.items(), costs):
        row = {**info, **cost, "params_removed": round(1 - cost["params"] / base["params"], 4),
               "macs_removed": round(1 - cost["macs"] / base["macs"], 4),
               "speedup_batch1": round(base["latency_ms_batch1"] / cost["latency_ms_batch1"], 3),
               f"speedup_batch{BATCH}": round(base[f"latency_ms_batch{BATCH}"] / cost[f"latency_ms_batch{BATCH}"], 3)}
        if "round_to" in label:
            row["widths_multiple_of_8"] = widths_aligned(plan, pruned)
        if task is not None:
            row["accuracy"] = round(task.evaluate(pruned)["accuracy"], 4)
        rows[label] = row
    return {"steps": len(plan.steps), "method": plan.method, "params": count_params(model),
            "plan_seconds": round(planned, 1), "seconds": round(time.perf_counter() - started, 1), "points": rows}


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = ["# Measured speed-ups of pruned models (issue #18)", "",
             f"Command: `{env['command']}`. Machine: {env['machine']}; torch {env['torch']}, "
             f"{env['threads']} intra-op thread. The machine was **not idle** (two other sessions ran on its 2 cores): "
             "absolute milliseconds mean little; the points of one model were timed in turns "
             "(`cswap.metrics.compare_costs`), so their ratios (the speed-ups) are comparable within this run.", "",
             f"Points: the shortest prefix removing {PARAMS_RATIO:.0%} of the parameters; the same target replayed "
             f"with `round_to: {ROUND_TO}`; the shortest prefix measured x{TARGET} faster at batch 1 "
             "(`pruning.latency_ratio`, table then measured bisection; 'search' is the speed-up it measured, "
             "'x b1' the one measured again beside the other points).", ""]
    for name, model in result["models"].items():
        lines += [f"## {name}", "", f"{model['params']:,} parameters, {model['method']} plan of {model['steps']} steps "
                  f"(built in {model['plan_seconds']} s); this model took {model['seconds']} s.", "",
                  f"| point | steps | params removed | MACs removed | x b1 | x b{BATCH} | ms b1 | ms b{BATCH} | notes |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for label, r in model["points"].items():
            notes = []
            if "accuracy" in r:
                notes.append(f"accuracy {r['accuracy']:.2%}")
            if r.get("widths_multiple_of_8") is not None:
                notes.append(f"pruned widths multiples of 8: {r['widths_multiple_of_8']}")
            if "search" in r:
                s = r["search"]
                notes.append(f"search: x{s['measured_speedup']} measured (predicted x{s['predicted_speedup']}, table's "
                             f"first guess {s['predicted_steps']} steps, {len(s['measurements'])} measurements, "
                             f"{r['search_seconds']} s)")
            lines.append(f"| {label} | {r['steps']} | {r['params_removed']:.1%} | {r['macs_removed']:.1%} | "
                         f"{r['speedup_batch1']:.2f} | {r[f'speedup_batch{BATCH}']:.2f} | {r['latency_ms_batch1']:.3f} | "
                         f"{r[f'latency_ms_batch{BATCH}']:.2f} | {'; '.join(notes)} |")
        lines.append("")
    return "\n".join(lines)


def _write_keeping_sections(path: Path, text: str) -> None:
    """Write this benchmark's part of latency.md and keep what another script wrote after it
    (benchmarks/latency_backends.py's section between its markers, and the reading below it)."""
    marker = "<!-- latency_backends: start -->"
    old = path.read_text() if path.exists() else ""
    kept = old[old.index(marker):] if marker in old else ""
    path.write_text(text.rstrip("\n") + ("\n\n" + kept if kept else "\n"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer timing rounds, demo S at M_k = 16")
    p.add_argument("--models", default="", help="comma-separated substrings of model names to run (default all)")
    p.add_argument("--out", type=Path, default=REPO / "docs/results/latency.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    names = [n for n in MODELS if not args.models or any(s.strip() in n for s in args.models.split(","))]
    env = {"command": "python benchmarks/latency.py" + (" --quick" if args.quick else ""), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "machine": f"{platform.processor() or platform.machine()}, "
           f"{__import__('os').cpu_count()} cores, shared"}
    result = {"environment": env, "models": {}}
    for name in names:
        result["models"][name] = measure(name, args.quick)
        args.out.write_text(json.dumps(result, indent=1) + "\n")  # after every model: a long run is never lost
        _write_keeping_sections(args.out.with_suffix(".md"), markdown(result))
        print(f"{name}: done in {result['models'][name]['seconds']} s", flush=True)
    print(markdown(result))


if __name__ == "__main__":
    main()
