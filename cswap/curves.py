"""Pruning curves and SAUCE for several criteria (`cswap curve`), the paper's Fig. 5 / Table 3.

One analysis per (criterion, seed) gives a plan; the plan is then replayed at every ratio
(`cswap.replay`, with the run's alignment and recovery) and the task's metric measured on the held-out
split. Ratios beyond what the plan can remove (each layer keeps one channel, the head is
never pruned) are not evaluated: the curve ends with one point at the plan's full length,
and SAUCE counts nothing beyond it (see `cswap.sauce`). Plans are saved, so a curve can be
re-plotted or extended without redoing the analyses. What is written is `cswap.reports`'.

Criteria are named as registered; `NAME/layer` runs the same criterion with the option
`normalize: layer` (per-layer normalised ranking), so both variants appear side by side.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from . import registry
from .build import analysis_from_config
from .config import RunConfig
from .errors import ConfigError, ModelError
from .interfaces import Analysis, Task
from .metrics import latencies_ms
from .options import Target
from .plan import PruningPlan
from .removal import count_params
from .replay import ReplayData, replay_steps, steps_for
from .reports import CurveResult, write_curve_outputs
from .sauce import sauce

log = logging.getLogger("cswap")

DEFAULT_RATIOS = tuple(round(0.05 * i, 2) for i in range(20))  # 0, 0.05, ..., 0.95


@dataclass(frozen=True)
class CriterionSpec:
    label: str  # as shown in tables and plots
    name: str  # registered criterion
    options: dict = field(default_factory=dict)


def parse_criteria(text: str, extra_options: dict | None = None) -> list[CriterionSpec]:
    """`cswap,magnitude,magnitude/layer` -> specs; `extra_options` maps a name or label to options
    (a key naming no registered criterion is a typo, refused; each value a mapping)."""
    extra_options = extra_options or {}
    specs, available = [], registry.available("criteria")
    for key, value in extra_options.items():
        if not isinstance(key, str) or key.partition("/")[0] not in available:
            raise ConfigError(f"criterion options given for {key!r}, which is not a criterion; available: "
                              f"{', '.join(available)}")
        if not isinstance(value, dict):
            raise ConfigError(f"criterion options for {key!r} must be a mapping of option names to values, "
                              f"got {value!r}")
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
    if not ratios or not all(math.isfinite(r) for r in ratios) or ratios[0] < 0 or ratios[-1] >= 1:
        raise ConfigError(f"ratios must lie in [0, 1), got {text!r}")
    return ratios if ratios[0] == 0 else (0.0, *ratios)


def replay_curve(model: nn.Module, plan: PruningPlan, task: Task, ratios, adapter, metric: str, unpruned: float,
                 *, target: Target, data: ReplayData, latency_inputs=None, per_class: bool = False) -> list[dict]:
    """The metric at each parameter share the plan can reach, then once at its full length;
    each model replayed as `target` says (its `round_to` and recovery; the share replaces its
    kind) on `data` (`cswap.replay`). The share reported is counted on the replayed model.
    With `latency_inputs`, also its measured speed-up over `model` on them (timed in turns
    with it: `metrics.latencies_ms`); with `per_class`, every class's metric (`class_<k>`)."""
    reachable = plan.reachable_ratio()
    targets = [r for r in ratios if r <= reachable + 1e-12]
    if len(targets) < len(ratios):
        targets.append(reachable)
    rows, cache = [], {0: (unpruned, 0.0, 1.0)}
    classes = {0: class_metrics(task, model)} if per_class else {}
    for r in targets:
        k = len(plan.steps) if r == reachable else steps_for(plan, model, target.to(params_ratio=r), adapter)[0]
        if k not in cache:
            pruned = replay_steps(plan, model, k, target, data, adapter=adapter).model
            speedup = None
            if latency_inputs is not None:
                original, small = latencies_ms([model, pruned], latency_inputs, min_seconds=0.3)
                speedup = original / small
            cache[k] = (task.evaluate(pruned)[metric], 1 - count_params(pruned) / plan.params_total, speedup)
            if per_class:
                classes[k] = class_metrics(task, pruned)
        value, share, speedup = cache[k]
        row = {"target_ratio": round(float(r), 6), "params_ratio": share, "steps": k, metric: value,
               **classes.get(k, {})}
        rows.append({**row, "speedup": round(speedup, 4)} if latency_inputs is not None else row)
    return rows


def class_metrics(task: Task, model: nn.Module) -> dict[str, float]:
    """Every class's metric on the evaluation split (`class_<k>`; NaN for a class it lacks)."""
    per_class = task.outcomes(model, next(model.parameters()).device).per_class()
    return {f"class_{k}": float(v) for k, v in enumerate(per_class)}


def check_per_class(task: Task) -> None:
    """Refuse per-class curves for a task that declares no per-class metric (one line)."""
    if not (task.measures_outcomes and task.per_class_metric):
        name = registry.registered_name("tasks", type(task)) or type(task).__name__
        raise ConfigError(f"task {name!r} declares no per-class metric (Task.outcomes): per-class curves cannot be "
                          "drawn for it")


def run_curves(analysis: Analysis, specs: list[CriterionSpec], seeds: list[int], ratios=DEFAULT_RATIOS, *,
               target: Target | None = None, plans_dir: Path | None = None, latency: bool = False,
               per_class: bool = False) -> CurveResult:
    """Rank with every criterion and seed, replay each plan at `ratios` as `target` says (its
    alignment and recovery; default: the default target's), measure, and score; `latency`:
    also each point's measured speed-up at batch 1 on the analysis's device; `per_class`:
    every class's metric at each point (`curve_per_class.png`)."""
    target = target if target is not None else Target()
    if target.kind == "quality":  # a curve replays at shares: a quality target's search has no part in it
        target = target.to(params_ratio=None)
    if per_class:
        check_per_class(analysis.task)
    a = analysis
    metric = a.task.metric
    a.model.eval()
    unpruned = a.task.evaluate(a.model)[metric]
    rows, analyses = [], []
    jobs = [(spec, seed) for spec in specs for seed in seeds]
    bar = tqdm(jobs, desc="curves", unit="analysis", disable=not a.progress)
    for spec, seed in bar:
        bar.set_postfix_str(f"{spec.label} seed {seed}")
        criterion = registry.create("criteria", spec.name, spec.options)
        started = time.perf_counter()
        plan = PruningPlan.from_analysis(a, criterion.rank(a, seed))
        seconds = time.perf_counter() - started
        if plans_dir is not None:
            plan.save(plans_dir / f"{spec.label.replace('/', '-')}-seed{seed}.json")
        curve = replay_curve(a.model, plan, a.task, ratios, a.adapter, metric, unpruned, target=target,
                             data=ReplayData.for_task(a.task, plan, target),
                             latency_inputs=a.example_inputs.to(a.device) if latency else None, per_class=per_class)
        for row in curve:
            rows.append({"criterion": spec.label, "seed": seed, **row})
        area = sauce([r["params_ratio"] for r in curve], [100.0 * r[metric] for r in curve])
        analyses.append({"criterion": spec.label, "seed": seed, "seconds": round(seconds, 3), "sauce": area,
                         "max_params_ratio": curve[-1]["params_ratio"], "categories": plan.category_counts(),
                         "num_noncritical": plan.num_noncritical})
    names = a.task.outcomes(a.model, a.device).names if per_class else None
    return CurveResult(metric, unpruned, count_params(a.model), rows, analyses, names)


def curve_from_config(cfg: RunConfig, specs: list[CriterionSpec], seeds: int, ratios, out: Path,
                      progress: bool = True, latency: bool = False,
                      per_class: bool = False) -> tuple[CurveResult, dict[str, Path]]:
    analysis, _ = analysis_from_config(cfg, progress=progress)
    if not analysis.units.layers:
        raise ModelError("the model has no prunable units")
    seed_list = [cfg.seed + i for i in range(seeds)]
    result = run_curves(analysis, specs, seed_list, ratios, target=cfg.pruning.target, plans_dir=out / "plans",
                        latency=latency, per_class=per_class)
    meta = {"config": cfg.name, "model": f"{cfg.model.source}:{cfg.model.name}", "seeds": seed_list,
            "ratios": list(ratios), "criteria": [asdict(c) for c in specs]}
    return result, write_curve_outputs(result, out, f"{cfg.name} ({cfg.model.name})", meta)
