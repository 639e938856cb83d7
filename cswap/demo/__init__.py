"""`cswap demo`: C-SWAP on the embedded Fashion-MNIST ResNet-8, nothing downloaded.

The checkpoint, a 2,640-image subset and the demo's config (`demo.yaml`, the only copy) ship
in this folder (Fashion-MNIST, MIT licence, see ATTRIBUTION.md); `benchmarks/train_fashion_mnist.py`
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
    in the plan's `critical_order`, compensated and repaired as the run was. Replays are cheap; the
    analysis is never redone."""
    from ..build import build_model, build_task, resolve_adapter
    from ..plan import PruningPlan
    from ..replay import calibration_for

    cfg = parse_config(load_config_text((run_dir / "config.yaml").read_text(), run_dir / "config.yaml"))
    model, _ = build_model(cfg.model)
    task = build_task(cfg.task)
    _, adapter = resolve_adapter(cfg.adapter, model)
    plan = PruningPlan.load(run_dir / "plan.json")
    sample_set, recovery = task.manifold(cfg.seed), cfg.pruning.recovery
    calibration = calibration_for(task, cfg.seed, recovery, sample_set)
    cells = []
    for r in ratios:
        pruned = plan.apply(model, params_ratio=r, adapter=adapter, sample_set=sample_set, calibration=calibration,
                            recovery=recovery if recovery.methods else None)
        acc = task.evaluate(pruned)["accuracy"]
        cells.append(f"{r:.0%}: {acc:.1%}")
    repair = f", recovery {recovery.method}" if recovery.methods else ""
    return f"replaying the plan to a parameter target (accuracy{repair}): " + ", ".join(cells)
