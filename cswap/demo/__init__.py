"""`cswap demo`: C-SWAP on the embedded Fashion-MNIST ResNet-8, nothing downloaded.

The checkpoint, a 5,640-image subset (S's split, the evaluation split and a validation split for
quality targets) and the demo's config (`demo.yaml`, the only copy) ship in this folder
(Fashion-MNIST, MIT licence, see ATTRIBUTION.md); `benchmarks/train_fashion_mnist.py`
and `benchmarks/make_demo_subset.py` regenerate the data files.
"""
from __future__ import annotations

from pathlib import Path

from ..config import RunConfig, load_config, load_config_text, parse_config

DEMO_DIR = Path(__file__).parent
DEMO_CONFIG = DEMO_DIR / "demo.yaml"


def demo_config(samples_per_class: int = 32, overrides: list[str] = (), preset: str | None = None) -> RunConfig:
    """The packaged demo config, with its own M_k changed if asked, a preset and `overrides` on top."""
    return load_config(DEMO_CONFIG, [f"task.options.samples_per_class={samples_per_class}", *overrides], preset=preset)


def ratio_table(run_dir: Path, ratios=(0.3, 0.6, 0.7, 0.8)) -> str:
    """Accuracy when the run's plan is replayed to larger targets: critical units go too,
    in the plan's `critical_order`, compensated and repaired as the run was (the run's target
    with another share, `cswap.replay`). Replays are cheap; the analysis is never redone."""
    from ..build import build_model, build_task, resolve_adapter
    from ..plan import PruningPlan
    from ..replay import ReplayData, prune

    cfg = parse_config(load_config_text((run_dir / "config.yaml").read_text(), run_dir / "config.yaml"))
    model, _ = build_model(cfg.model)
    task = build_task(cfg.task)
    _, adapter = resolve_adapter(cfg.adapter, model)
    plan = PruningPlan.load(run_dir / "plan.json")
    target = cfg.pruning.target
    data = ReplayData.for_task(task, plan, target)
    cells = []
    for r in ratios:
        pruned = prune(plan, model, target.to(params_ratio=r), data, adapter=adapter).model
        cells.append(f"{r:.0%}: {task.evaluate(pruned)['accuracy']:.1%}")
    repair = f", recovery {target.recovery.method}" if target.recovery.methods else ""
    return f"replaying the plan to a parameter target (accuracy{repair}): " + ", ".join(cells)
