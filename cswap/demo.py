"""`cswap demo`: C-SWAP on the embedded Fashion-MNIST ResNet-8, nothing downloaded.

The checkpoint and a 2,640-image subset ship in `cswap/demo/` (Fashion-MNIST, MIT licence,
see ATTRIBUTION.md there); `benchmarks/train_fashion_mnist.py` regenerates them.
"""
from __future__ import annotations

from pathlib import Path

from .config import RunConfig, parse_config

DEMO_DIR = Path(__file__).parent / "demo"


def demo_config(samples_per_class: int = 32, output_dir: str | Path = "runs") -> RunConfig:
    return parse_config({
        "name": "demo",
        "seed": 0,
        "threads": 1,  # a 78k-parameter model: one thread is as fast and gives stable latencies
        "model": {
            "source": "cswap",
            "name": "cifar_resnet8",
            "kwargs": {"width": 16, "in_channels": 1, "num_classes": 10},
            "weights": str(DEMO_DIR / "fashion_resnet8.pt"),
        },
        "task": {"name": "classification", "options": {
            "dataset": "npz",
            "root": str(DEMO_DIR / "fashion_mnist_subset.npz"),
            "manifold_split": "manifold",
            "eval_split": "eval",
            "samples_per_class": samples_per_class,
            "mean": [0.2860],  # the Fashion-MNIST statistics the model was trained with
            "std": [0.3530],
        }},
        "test": {"name": "paired_t", "options": {"alpha": 0.05, "voting": "per_class"}},
        "output": {"dir": str(output_dir), "latency_repeats": 20},
    })


def ratio_table(run_dir: Path, ratios=(0.1, 0.2, 0.3, 0.4, 0.5)) -> str:
    """Accuracy when the run's plan is replayed to larger targets: critical units go too,
    least beneficial first. Replays are cheap; the analysis is never redone."""
    import yaml

    from .build import build_model, build_task, resolve_adapter
    from .plan import PruningPlan

    cfg = parse_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    model, _ = build_model(cfg.model)
    task = build_task(cfg.task)
    _, adapter = resolve_adapter(cfg.adapter, model)
    plan = PruningPlan.load(run_dir / "plan.json")
    cells = []
    for r in ratios:
        acc = task.evaluate(plan.apply(model, params_ratio=r, adapter=adapter))["accuracy"]
        cells.append(f"{r:.0%}: {acc:.1%}")
    return "replaying the plan to a parameter target (accuracy): " + ", ".join(cells)


def summary(report: dict) -> str:
    """The before/after table the demo prints (and README quotes)."""
    b, a = report["before"], report["after"]
    metric = report.get("metric", "accuracy")
    batch_key = next(k for k in b if k.startswith("latency_ms_batch") and k != "latency_ms_batch1")
    rows = [
        ("parameters", f"{b['params']:,}", f"{a['params']:,}", f"-{report['params_removed_ratio']:.1%}"),
        ("MACs / image", f"{b['macs']:,}", f"{a['macs']:,}", f"-{report['macs_removed_ratio']:.1%}"),
        ("latency, batch 1 (ms)", f"{b['latency_ms_batch1']:.2f}", f"{a['latency_ms_batch1']:.2f}",
         f"x{b['latency_ms_batch1'] / a['latency_ms_batch1']:.2f}"),
        (f"latency, {batch_key[11:].replace('batch', 'batch ')} (ms)", f"{b[batch_key]:.2f}", f"{a[batch_key]:.2f}",
         f"x{b[batch_key] / a[batch_key]:.2f}"),
        (f"{metric} (held-out{', ' + str(b['eval_samples']) + ' samples' if 'eval_samples' in b else ''})",
         f"{b[metric]:.2%}", f"{a[metric]:.2%}", f"{(a[metric] - b[metric]) * 100:+.2f} pt"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'original':>12}  {'pruned':>12}  {'change':>9}"]
    lines += [f"{r[0]:<{width}}  {r[1]:>12}  {r[2]:>12}  {r[3]:>9}" for r in rows]
    c = report["categories"]
    lines.append(
        f"units: {report['units_total']} analysed -> {c.get('neutral', 0)} neutral, "
        f"{c.get('detrimental', 0)} detrimental, {c.get('critical', 0)} critical, "
        f"{c.get('untested', 0)} kept as last of their layer; {report['units_removed']} removed"
    )
    lines.append(f"analysis {report['analysis_seconds']:.1f} s, total {report['total_seconds']:.1f} s")
    return "\n".join(lines)
