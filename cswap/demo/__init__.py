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


def demo_config(samples_per_class: int = 32) -> RunConfig:
    """The packaged demo config, with its own M_k changed if asked."""
    return load_config(DEMO_CONFIG, [f"task.options.samples_per_class={samples_per_class}"])


def ratio_table(run_dir: Path, ratios=(0.1, 0.2, 0.3, 0.4, 0.5)) -> str:
    """Accuracy when the run's plan is replayed to larger targets: critical units go too,
    least beneficial first. Replays are cheap; the analysis is never redone."""
    from ..build import build_model, build_task, resolve_adapter
    from ..plan import PruningPlan

    cfg = parse_config(load_config_text((run_dir / "config.yaml").read_text(), run_dir / "config.yaml"))
    model, _ = build_model(cfg.model)
    task = build_task(cfg.task)
    _, adapter = resolve_adapter(cfg.adapter, model)
    plan = PruningPlan.load(run_dir / "plan.json")
    cells = []
    for r in ratios:
        acc = task.evaluate(plan.apply(model, params_ratio=r, adapter=adapter))["accuracy"]
        cells.append(f"{r:.0%}: {acc:.1%}")
    return "replaying the plan to a parameter target (accuracy): " + ", ".join(cells)
