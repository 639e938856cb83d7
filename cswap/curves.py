"""Pruning curves and SAUCE for several criteria (`cswap curve`), the paper's Fig. 5 / Table 3.

One analysis per (criterion, seed) gives a plan; the plan is then replayed at every ratio
(`PruningPlan.apply_prefix` on a fresh copy) and the task's metric measured on the held-out
split. Ratios beyond what the plan can remove (each layer keeps one channel, the head is
never pruned) are not evaluated: the curve ends with one point at the plan's full length,
and SAUCE counts nothing beyond it (see `cswap.sauce`). Plans are saved, so a curve can be
re-plotted or extended without redoing the analyses. What is written is `cswap.reports`'.

Criteria are named as registered; `NAME/layer` runs the same criterion with the option
`normalize: layer` (per-layer normalised ranking), so both variants appear side by side.
"""
from __future__ import annotations

import logging
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
from .plan import PruningPlan
from .removal import count_params
from .replay import calibration_for
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


def replay_curve(model: nn.Module, plan: PruningPlan, task: Task, ratios, adapter, metric: str, unpruned: float,
                 *, sample_set=None, calibration=None, recovery=None, latency_inputs=None) -> list[dict]:
    """The metric at each target ratio the plan can reach, then once at its full length; each
    model replayed as `PruningPlan.apply_prefix` does (compensated with `sample_set`,
    repaired by `recovery` on `calibration`). With `latency_inputs`, also its measured
    speed-up over `model` on them (timed in turns with it: `metrics.latencies_ms`)."""
    removed = plan.cumulative_params_removed()
    reachable = removed[-1] / max(plan.params_total, 1)
    targets = [r for r in ratios if r <= reachable + 1e-12]
    if len(targets) < len(ratios):
        targets.append(reachable)
    rows, cache, speedups = [], {0: unpruned}, {0: 1.0}
    for r in targets:
        k = len(plan.steps) if r == reachable else plan.prefix_for(r)
        if k not in cache:
            pruned = plan.apply_prefix(model, k, adapter=adapter, sample_set=sample_set, calibration=calibration,
                                       recovery=recovery)
            cache[k] = task.evaluate(pruned)[metric]
            if latency_inputs is not None:
                original, small = latencies_ms([model, pruned], latency_inputs, min_seconds=0.3)
                speedups[k] = original / small
        row = {"target_ratio": round(float(r), 6), "params_ratio": removed[k] / plan.params_total, "steps": k,
               metric: cache[k]}
        rows.append({**row, "speedup": round(speedups[k], 4)} if latency_inputs is not None else row)
    return rows


def run_curves(analysis: Analysis, specs: list[CriterionSpec], seeds: list[int], ratios=DEFAULT_RATIOS, *,
               plans_dir: Path | None = None, latency: bool = False) -> CurveResult:
    """Rank with every criterion and seed, replay each plan at `ratios`, measure, and score;
    `latency`: also each point's measured speed-up at batch 1 on the analysis's device."""
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
        plan = PruningPlan.from_ranking(a.model, a.units, criterion.rank(a, seed), adapter=a.adapter_name)
        seconds = time.perf_counter() - started
        if plans_dir is not None:
            plan.save(plans_dir / f"{spec.label.replace('/', '-')}-seed{seed}.json")
        curve = replay_curve(a.model, plan, a.task, ratios, a.adapter, metric, unpruned, **replay_data(a, seed),
                             latency_inputs=a.example_inputs.to(a.device) if latency else None)
        for row in curve:
            rows.append({"criterion": spec.label, "seed": seed, **row})
        area = sauce([r["params_ratio"] for r in curve], [100.0 * r[metric] for r in curve])
        analyses.append({"criterion": spec.label, "seed": seed, "seconds": round(seconds, 3), "sauce": area,
                         "max_params_ratio": curve[-1]["params_ratio"], "categories": plan.category_counts(),
                         "num_noncritical": plan.num_noncritical})
    return CurveResult(metric, unpruned, count_params(a.model), rows, analyses)


def replay_data(analysis: Analysis, seed: int) -> dict:
    """What a replay of this seed's plan needs: S (a compensated plan's statistics), the
    calibration data and the recovery of the run's options."""
    recovery = analysis.options.recovery
    sample_set = analysis.task.manifold(seed)
    calibration = calibration_for(analysis.task, seed, recovery, sample_set)
    return {"sample_set": sample_set, "calibration": calibration, "recovery": recovery if recovery.methods else None}


def curve_from_config(cfg: RunConfig, specs: list[CriterionSpec], seeds: int, ratios, out: Path,
                      progress: bool = True, latency: bool = False) -> tuple[CurveResult, dict[str, Path]]:
    analysis, _ = analysis_from_config(cfg, progress=progress)
    if not analysis.units.layers:
        raise ModelError("the model has no prunable units")
    seed_list = [cfg.seed + i for i in range(seeds)]
    result = run_curves(analysis, specs, seed_list, ratios, plans_dir=out / "plans", latency=latency)
    meta = {"config": cfg.name, "model": f"{cfg.model.source}:{cfg.model.name}", "seeds": seed_list,
            "ratios": list(ratios), "criteria": [asdict(c) for c in specs]}
    return result, write_curve_outputs(result, out, f"{cfg.name} ({cfg.model.name})", meta)
