"""Which pruned widths are fast where the model is deployed: `round_to` 1, 4, 8, 16 at 50 % of
the parameters, timed in eager PyTorch and in onnxruntime at batch 1 and 32 (issue 28).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/latency_backends.py        # ~50 min on a loaded 2-core machine
    python benchmarks/latency_backends.py --quick                            # fewer rounds, to try the script
    python benchmarks/latency_backends.py --report-only                      # rewrite the section from the JSON

For each model a magnitude ranking (the ViT: a seeded random order; magnitude cannot score
attention heads) is replayed to the shortest prefix removing 50 % of the parameters with every
pruned width a multiple of `round_to` (1: as the plan says), without recovery: only the shapes
matter for timing. The original and the four pruned models are prepared in both backends
(`cswap.backends`: onnxruntime runs the file `cswap export` would write, dynamic batch) and
all ten runners are timed in turns, one call each per round, so machine load hits every model
and both backends alike; each timing carries its spread (interquartile range / median).
One torch thread and one onnxruntime intra-op thread.

Models (random initialisation is enough for latency; the Fashion-MNIST checkpoints are loaded
where the config names one that is present): the demo ResNet-8 (cswap/demo), ResNet-20 width
32 and the ViT (configs/fashion_mnist_resnet20_w32.yaml, configs/fashion_mnist_vit_p7_d128.yaml),
the small MobileNetV2 (configs/fashion_mnist_mobilenetv2.yaml), all at 1x28x28, and torchvision's
ResNet-18 at 3x32x32. No data set is needed: the checkpoints are in the repository, and a
missing one falls back to random weights (said in the JSON).

Resumable: every model's result is written to docs/results/latency_backends.json as soon as it
is measured and skipped on the next run (`--force` measures again). The section "Widths that
suit the runtime" of docs/results/latency.md is replaced (the rest of the file is kept); its
reading is written by hand under the generated tables.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

RESULTS = REPO / "docs" / "results"
JSON_PATH = RESULTS / "latency_backends.json"
MARKDOWN = RESULTS / "latency.md"
START, END = "<!-- latency_backends: start -->", "<!-- latency_backends: end -->"
ROUND_TO = (1, 4, 8, 16)
BACKENDS = ("torch", "onnxruntime")
BATCHES = (1, 32)
PARAMS_RATIO = 0.5


# ---- models ---------------------------------------------------------------------------------
def _from_config(path: str | Path) -> nn.Module:
    """The model of a config, with its checkpoint when present (else random weights)."""
    from cswap.build import build_model
    from cswap.config import load_config

    cfg = load_config(path)
    model, _ = build_model(cfg.model, random_if_missing=True)
    return model.eval()


def _demo() -> nn.Module:
    return _from_config(REPO / "cswap" / "demo" / "demo.yaml")


def _torchvision_resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


# name: (builder, input shape, criterion)
MODELS = {
    "demo ResNet-8": (_demo, (1, 28, 28), "magnitude"),
    "ResNet-20 w32": (lambda: _from_config(REPO / "configs" / "fashion_mnist_resnet20_w32.yaml"), (1, 28, 28),
                      "magnitude"),
    "torchvision ResNet-18": (_torchvision_resnet18, (3, 32, 32), "magnitude"),
    "MobileNetV2": (lambda: _from_config(REPO / "configs" / "fashion_mnist_mobilenetv2.yaml"), (1, 28, 28),
                    "magnitude"),
    "ViT p7 d128": (lambda: _from_config(REPO / "configs" / "fashion_mnist_vit_p7_d128.yaml"), (1, 28, 28), "random"),
}


def make_plan(model: nn.Module, shape: tuple[int, ...], criterion: str):
    """A `criterion` ranking of every unit, as a plan (the criteria need an analysis: its data
    are random tensors, which magnitude and random never read)."""
    import cswap
    from cswap.build import analysis_for
    from cswap.plan import PruningPlan
    from cswap.tasks.classification import ClassificationTask

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, *shape, generator=g), torch.arange(10).repeat(4)
    analysis = analysis_for(model, ClassificationTask.from_tensors(x, y, 4))
    ranking = cswap.registry.create("criteria", criterion).rank(analysis, 0)
    return PruningPlan.from_analysis(analysis, ranking)


def pruned_at(plan, model: nn.Module, round_to: int) -> nn.Module:
    """The plan at 50 % of the parameters with widths a multiple of `round_to`: shapes only,
    no recovery (the one call into the replay's API)."""
    return plan.apply(model, params_ratio=PARAMS_RATIO, round_to=None if round_to == 1 else round_to,
                      recovery="none").eval()


# ---- measuring ------------------------------------------------------------------------------
def widths(plan, pruned: nn.Module) -> dict[str, int]:
    """The pruned width of every plan layer that lost units (its weight's first axis)."""
    out = {}
    for name, channels in plan.layers.items():
        weight = getattr(pruned.get_submodule(name), "weight", None)
        if weight is not None and weight.shape[0] != int(channels):
            out[name] = int(weight.shape[0])
    return out


def measure_model(name: str, repeats: int, min_seconds: float) -> dict:
    """Original and the four pruned models, both backends, both batches, timed in turns."""
    import tempfile

    from cswap.backends import prepare, time_runners
    from cswap.removal import count_params

    build, shape, criterion = MODELS[name]
    started = time.perf_counter()
    model = build()
    plan = make_plan(model, shape, criterion)
    models = {"original": model, **{f"round_to {r}": pruned_at(plan, model, r) for r in ROUND_TO}}
    x = torch.randn(max(BATCHES), *shape, generator=torch.Generator().manual_seed(1))
    record = {"input_shape": list(shape), "criterion": criterion, "plan_steps": len(plan.steps),
              "params": {k: count_params(m) for k, m in models.items()},
              "pruned_widths_multiple": {k: sorted({w % int(k.split()[-1]) == 0 for w in widths(plan, m).values()})
                                         for k, m in models.items() if k != "original"},
              "timings": {}}
    with tempfile.TemporaryDirectory(prefix="cswap-bench-") as folder:
        runners = []
        for backend in BACKENDS:  # one list: every round times every model in both backends
            runners += prepare(list(models.values()), x[:1], backend, threads=1, folder=Path(folder) / backend)
        record["prepare_seconds"] = round(time.perf_counter() - started, 1)
        for batch in BATCHES:
            timings = time_runners(runners, x[:batch], repeats, 3, min_seconds, threads=1)
            per_backend = {}
            for b, backend in enumerate(BACKENDS):
                part = timings[b * len(models):(b + 1) * len(models)]
                per_backend[backend] = {label: {**t.to_json(), "backend": backend} for label, t in zip(models, part)}
            record["timings"][f"batch {batch}"] = per_backend
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


# ---- the report -----------------------------------------------------------------------------
def speedup(record: dict, backend: str, batch: int, label: str, stat: str) -> float:
    """Original over pruned latency by `stat` ("median_ms" or "p10_ms")."""
    t = record["timings"][f"batch {batch}"][backend]
    return t["original"][stat] / t[label][stat]


def _table(results: dict, backend: str, batch: int) -> list[str]:
    """Speed-ups by the median (with its spread) and by the 10th percentile, per round_to."""
    head = "| model | original ms: median (spread), p10 | " + " | ".join(f"round_to {r}" for r in ROUND_TO) + " |"
    lines = [head, "|---|---|" + "---|" * len(ROUND_TO)]
    for name, record in results["models"].items():
        t = record["timings"][f"batch {batch}"][backend]
        base = t["original"]
        labels = [f"round_to {r}" for r in ROUND_TO]
        cells = [f"x{speedup(record, backend, batch, label, 'median_ms'):.2f} ({t[label]['spread']:.0%}), "
                 f"x{speedup(record, backend, batch, label, 'p10_ms'):.2f}" for label in labels]
        lines.append(f"| {name} | {base['median_ms']:.3f} ({base['spread']:.0%}), {base['p10_ms']:.3f} | "
                     + " | ".join(cells) + " |")
    return lines


def _params_table(results: dict) -> list[str]:
    lines = ["| model | parameters | " + " | ".join(f"removed, round_to {r}" for r in ROUND_TO) + " |",
             "|---|---|" + "---|" * len(ROUND_TO)]
    for name, record in results["models"].items():
        p = record["params"]
        cells = [f"{1 - p[f'round_to {r}'] / p['original']:.1%}" for r in ROUND_TO]
        lines.append(f"| {name} | {p['original']:,} | " + " | ".join(cells) + " |")
    return lines


def choose_default(results: dict, stat: str = "p10_ms") -> dict:
    """The round_to whose slowest onnxruntime cell (model x batch) is fastest: the promise is
    a pruned model faster than the original for every model; ties go to the geometric mean.
    Read by the 10th percentile, which machine load disturbs least."""
    import math

    worst, geomean = {}, {}
    for r in ROUND_TO:
        cells = [speedup(rec, "onnxruntime", b, f"round_to {r}", stat) for rec in results["models"].values()
                 for b in BATCHES]
        worst[r], geomean[r] = min(cells), math.exp(sum(map(math.log, cells)) / len(cells))
    best = max(ROUND_TO, key=lambda r: (round(worst[r], 2), geomean[r]))
    return {"statistic": stat, "worst_speedup_onnxruntime": {str(r): round(v, 3) for r, v in worst.items()},
            "geomean_speedup_onnxruntime": {str(r): round(v, 3) for r, v in geomean.items()}, "chosen": best}


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [START, "", "## Widths that suit the runtime: round_to in eager PyTorch and onnxruntime (issue 28)", "",
             f"Command: `{results['command']}`. Machine: {m['machine']}, {m['cores']} cores, load average "
             f"{m['load_start']} at the start and {m['load_end']} at the end: **not idle** (other sessions ran "
             f"benchmarks); torch {m['torch']}, onnxruntime {m['onnxruntime']}, 1 torch thread, 1 onnxruntime "
             "intra-op thread. All ten runners of a model (original + four widths, two backends) were timed in "
             "turns, so load hit them alike; speed-ups are comparable within a model's row, absolute "
             "milliseconds are not. Each cell: the speed-up of the medians (in brackets the pruned model's "
             "spread, interquartile range / median of its rounds; above 10 % `cswap.backends` marks a timing "
             "untrusted for a target), then the speed-up of the 10th percentiles (p10), which machine load "
             "disturbs least.",
             "", "Each pruned model removes 50 % of the parameters (a magnitude ranking; the ViT a seeded random "
             "order), its widths multiples of `round_to`, no recovery. Parameters removed:", "",
             *_params_table(results), ""]
    for backend in BACKENDS:
        for batch in BATCHES:
            lines += [f"### {backend}, batch {batch}: speed-up over the original", "", *_table(results, backend, batch),
                      ""]
    choice = choose_default(results)
    worst = ", ".join(f"{r}: x{s}" for r, s in choice["worst_speedup_onnxruntime"].items())
    geomean = ", ".join(f"{r}: x{s}" for r, s in choice["geomean_speedup_onnxruntime"].items())
    lines += [f"onnxruntime, by p10, over the five models and both batches: slowest cell by round_to {worst}; "
              f"geometric mean {geomean}. Chosen (fastest slowest cell, then geometric mean): "
              f"**round_to {choice['chosen']}**.", "", END]
    return "\n".join(lines) + "\n"


def write_markdown(results: dict) -> None:
    """Replace this benchmark's section of latency.md (between its markers), keeping the rest."""
    text = MARKDOWN.read_text() if MARKDOWN.exists() else ""
    section = markdown(results)
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    MARKDOWN.write_text(text)


# ---- main -----------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few rounds (to try the script)")
    p.add_argument("--force", action="store_true", help="measure again the models already in the JSON")
    p.add_argument("--report-only", action="store_true", help="rewrite the markdown section from the JSON")
    p.add_argument("--models", help="comma-separated subset of: " + ", ".join(MODELS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import onnxruntime

    results = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {"models": {}}
    load = os.getloadavg()[0]
    results["machine"] = {"machine": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
                          "onnxruntime": onnxruntime.__version__,
                          "load_start": results.get("machine", {}).get("load_start", round(load, 1)),
                          "load_end": round(load, 1)}
    results["command"] = "OMP_NUM_THREADS=1 nice -n 10 python benchmarks/latency_backends.py" + \
        (" --quick" if args.quick else "")
    names = [n.strip() for n in args.models.split(",")] if args.models else list(MODELS)
    for name in ([] if args.report_only else names):
        if name in results["models"] and not args.force:
            print(f"{name}: in {JSON_PATH.name}, skipped", flush=True)
            continue
        record = measure_model(name, repeats=5 if args.quick else 40, min_seconds=1.0 if args.quick else 40.0)
        results["models"][name] = record
        results["machine"]["load_end"] = round(os.getloadavg()[0], 1)
        JSON_PATH.write_text(json.dumps(results, indent=1) + "\n")
        print(f"{name}: {record['seconds']} s", flush=True)
    if all(n in results["models"] for n in MODELS):
        results["models"] = {n: results["models"][n] for n in MODELS}
        results["default"] = choose_default(results)
        JSON_PATH.write_text(json.dumps(results, indent=1) + "\n")
        write_markdown(results)
        print(f"written: {MARKDOWN} (section), {JSON_PATH}; default round_to {results['default']['chosen']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
