"""Pruning curves and SAUCE for several criteria (`cswap curve`), the paper's Fig. 5 / Table 3.

One analysis per (criterion, seed) gives a plan; the plan is then replayed at every ratio
(`PruningPlan.apply_prefix` on a fresh copy) and the task's metric measured on the held-out
split. Ratios beyond what the plan can remove (each layer keeps one channel, the head is
never pruned) are not evaluated: the curve ends with one point at the plan's full length,
and SAUCE counts nothing beyond it (see `cswap.sauce`). Plans are saved, so a curve can be
re-plotted or extended without redoing the analyses.

Criteria are named as registered; `NAME/layer` runs the same criterion with the option
`normalize: layer` (per-layer normalised ranking), so both variants appear side by side.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import registry
from .build import build_model, build_scorer, build_task, build_test, resolve_adapter
from .config import RunConfig
from .errors import ConfigError, ModelError
from .files import write_text_atomic
from .interfaces import Task
from .plan import PruningPlan
from .sauce import sauce
from .units import UnitGraph

log = logging.getLogger("cswap")

DEFAULT_RATIOS = tuple(round(0.05 * i, 2) for i in range(20))  # 0, 0.05, ..., 0.95


@dataclass(frozen=True)
class CriterionSpec:
    label: str  # as shown in tables and plots
    name: str  # registered criterion
    options: dict = field(default_factory=dict)


def parse_criteria(text: str, extra_options: dict | None = None) -> list[CriterionSpec]:
    """`cswap,magnitude,magnitude/layer` -> specs; `extra_options` maps a name or label to options."""
    extra_options = extra_options or {}
    specs, available = [], registry.available("criteria")
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        name, _, variant = item.partition("/")
        if name not in available:
            raise ConfigError(f"unknown criterion {name!r}; available: {', '.join(available)}")
        options = dict(extra_options.get(name, {}))
        if variant:
            if variant != "layer":
                raise ConfigError(f"criterion variant {item!r}: only NAME/layer (per-layer normalisation) exists")
            options["normalize"] = "layer"
        options.update(extra_options.get(item, {}) if variant else {})
        specs.append(CriterionSpec(item, name, options))
    if not specs:
        raise ConfigError("no criteria given")
    if len({s.label for s in specs}) != len(specs):
        raise ConfigError(f"criterion listed twice: {text}")
    return specs


def parse_ratios(text: str | None) -> tuple[float, ...]:
    if not text:
        return DEFAULT_RATIOS
    try:
        ratios = tuple(sorted({float(t) for t in text.split(",") if t.strip()}))
    except ValueError as exc:
        raise ConfigError(f"--ratios must be comma-separated numbers: {exc}") from None
    if not ratios or ratios[0] < 0 or ratios[-1] >= 1:
        raise ConfigError(f"ratios must lie in [0, 1), got {text!r}")
    return ratios if ratios[0] == 0 else (0.0, *ratios)


def replay_curve(model: nn.Module, plan: PruningPlan, task: Task, ratios, adapter, metric: str,
                 unpruned: float) -> list[dict]:
    """The metric at each target ratio the plan can reach, then once at its full length."""
    removed = plan.cumulative_params_removed()
    reachable = removed[-1] / max(plan.params_total, 1)
    targets = [r for r in ratios if r <= reachable + 1e-12]
    if len(targets) < len(ratios):
        targets.append(reachable)
    rows, cache = [], {0: unpruned}
    for r in targets:
        k = len(plan.steps) if r == reachable else plan.prefix_for(r)
        if k not in cache:
            cache[k] = task.evaluate(plan.apply_prefix(model, k, adapter=adapter))[metric]
        rows.append({"target_ratio": round(float(r), 6), "params_ratio": removed[k] / plan.params_total,
                     "steps": k, metric: cache[k]})
    return rows


@dataclass
class CurveResult:
    metric: str
    unpruned: float
    params_total: int
    rows: list[dict]  # one per (criterion, seed, ratio)
    analyses: list[dict]  # one per (criterion, seed): seconds, categories, SAUCE, reachable

    def sauce_table(self) -> list[dict]:
        out = []
        for label in dict.fromkeys(a["criterion"] for a in self.analyses):
            runs = [a for a in self.analyses if a["criterion"] == label]
            values = np.array([a["sauce"] for a in runs])
            out.append({"criterion": label, "sauce_mean": float(values.mean()),
                        "sauce_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                        "seeds": len(runs), "max_params_ratio": float(np.mean([a["max_params_ratio"] for a in runs])),
                        "analysis_seconds": float(np.mean([a["seconds"] for a in runs]))})
        return out


def run_curves(model: nn.Module, graph: UnitGraph, task: Task, specs: list[CriterionSpec], seeds: list[int],
               ratios=DEFAULT_RATIOS, *, adapter_name: str, adapter=None, context: dict | None = None,
               plans_dir: Path | None = None, progress: bool = True) -> CurveResult:
    """Analyse with every criterion and seed, replay each plan at `ratios`, measure, and score."""
    metric = task.metric
    model.eval()
    unpruned = task.evaluate(model)[metric]
    rows, analyses = [], []
    jobs = [(spec, seed) for spec in specs for seed in seeds]
    bar = tqdm(jobs, desc="curves", unit="analysis", disable=not progress)
    for spec, seed in bar:
        bar.set_postfix_str(f"{spec.label} seed {seed}")
        criterion = registry.create("criteria", spec.name, spec.options, adapter=adapter_name,
                                    **(context or {}))
        started = time.perf_counter()
        plan = criterion.plan(model, graph, task, seed)
        seconds = time.perf_counter() - started
        if plans_dir is not None:
            plan.save(plans_dir / f"{spec.label.replace('/', '-')}-seed{seed}.json")
        curve = replay_curve(model, plan, task, ratios, adapter, metric, unpruned)
        for row in curve:
            rows.append({"criterion": spec.label, "seed": seed, **row})
        area = sauce([r["params_ratio"] for r in curve], [100.0 * r[metric] for r in curve])
        analyses.append({"criterion": spec.label, "seed": seed, "seconds": round(seconds, 3), "sauce": area,
                         "max_params_ratio": curve[-1]["params_ratio"], "categories": plan.category_counts(),
                         "num_noncritical": plan.num_noncritical})
    return CurveResult(metric, unpruned, int(sum(p.numel() for p in model.parameters())), rows, analyses)


# ---- outputs ----------------------------------------------------------------------------

def sauce_markdown(result: CurveResult, title: str = "SAUCE") -> str:
    lines = [f"# {title}", "",
             f"Unpruned {result.metric}: {100 * result.unpruned:.2f} %. SAUCE = area under {result.metric} (%) "
             "vs fraction of parameters removed; nothing is counted beyond the last reachable ratio.", "",
             "| criterion | SAUCE (mean ± std) | seeds | max params removed | analysis s |",
             "|---|---|---|---|---|"]
    for r in sorted(result.sauce_table(), key=lambda r: -r["sauce_mean"]):
        lines.append(f"| {r['criterion']} | {r['sauce_mean']:.1f} ± {r['sauce_std']:.1f} | {r['seeds']} | "
                     f"{100 * r['max_params_ratio']:.1f} % | {r['analysis_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def rows_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def plot_curves(result: CurveResult, path: Path, title: str = "") -> Path:
    """Mean metric vs mean parameters removed per criterion (band: ± std over seeds), Fig. 5 style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label in dict.fromkeys(r["criterion"] for r in result.rows):
        mine = [r for r in result.rows if r["criterion"] == label]
        targets = sorted({r["target_ratio"] for r in mine})
        x, y, s = [], [], []
        for t in targets:
            pts = [r for r in mine if r["target_ratio"] == t]
            x.append(100 * np.mean([p["params_ratio"] for p in pts]))
            vals = [100 * p[result.metric] for p in pts]
            y.append(np.mean(vals))
            s.append(np.std(vals))
        line, = ax.plot(x, y, marker=".", label=label)
        ax.fill_between(x, np.array(y) - s, np.array(y) + s, color=line.get_color(), alpha=0.15)
    ax.axhline(100 * result.unpruned, color="k", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel(f"{result.metric} (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_curve_outputs(result: CurveResult, out: Path, title: str, meta: dict) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "csv": write_text_atomic(out / "curve.csv", rows_csv(result.rows)),
        "json": write_text_atomic(out / "curve.json", json.dumps(
            {**meta, **asdict(result), "sauce": result.sauce_table()}, indent=1) + "\n"),
        "md": write_text_atomic(out / "sauce.md", sauce_markdown(result, f"SAUCE: {title}")),
    }
    files["png"] = plot_curves(result, out / "curve.png", title)
    return files


# ---- from a config ------------------------------------------------------------------------

@dataclass
class Setup:
    """What every analysis of one config shares: model, task, units and the C-SWAP statistics."""

    cfg: RunConfig
    model: nn.Module
    task: Task
    graph: UnitGraph
    adapter_name: str
    adapter: object
    context: dict


def setup_from_config(cfg: RunConfig, task_options: dict | None = None, test_options: dict | None = None,
                      progress: bool = False) -> Setup:
    model, note = build_model(cfg.model)
    log.info("model %s:%s, %s", cfg.model.source, cfg.model.name, note)
    task_ref = cfg.task.model_copy(update={"options": {**cfg.task.options, **(task_options or {})}})
    task = build_task(task_ref)
    test_ref = cfg.test
    if test_options:
        from .config import PluginRef

        base = cfg.test or PluginRef(name=task.default_test)
        test_ref = base.model_copy(update={"options": {**base.options, **test_options}})
    adapter_name, adapter = resolve_adapter(cfg.adapter, model)
    device = torch.device(cfg.device)
    model = model.to(device).eval()
    x = task.example_inputs().to(device)
    graph = adapter.units(model, x).verified(model, adapter, x)
    if not graph.layers:
        raise ModelError("the model has no prunable units")
    context = {"scorer": build_scorer(cfg.scorer, task), "test": build_test(test_ref, task),
               "device": device, "progress": progress, "stages": adapter.stages}
    return Setup(cfg, model, task, graph, adapter_name, adapter, context)


def curve_from_config(cfg: RunConfig, specs: list[CriterionSpec], seeds: int, ratios, out: Path,
                      progress: bool = True) -> tuple[CurveResult, dict[str, Path]]:
    torch.manual_seed(cfg.seed)
    s = setup_from_config(cfg)
    seed_list = [cfg.seed + i for i in range(seeds)]
    result = run_curves(s.model, s.graph, s.task, specs, seed_list, ratios, adapter_name=s.adapter_name,
                        adapter=s.adapter, context=s.context, plans_dir=out / "plans", progress=progress)
    meta = {"config": cfg.name, "model": f"{cfg.model.source}:{cfg.model.name}", "seeds": seed_list,
            "ratios": list(ratios), "criteria": [asdict(c) for c in specs]}
    return result, write_curve_outputs(result, out, f"{cfg.name} ({cfg.model.name})", meta)
