"""Quality targets (`pruning.max_drop`, `max_class_drop`): the largest prefix of a plan whose
replay keeps the task's metric within the stated drop, as an upper confidence bound on
validation data (`cswap.quality`).

Why a search by replay: the analysis ran once and ordered every unit; how far to go along that
order is a question about the deployed model (compensated, repaired, removed), so each
candidate is the real replay (`cswap.replay.replay_steps`, with the target's recovery and
alignment), measured on validation data that never touched S, the calibration set or the
evaluation split. The test split is measured at the chosen point by the run, never here.

How: the met/not-met predicate is taken to be monotone in the number of steps (removing more
never makes the bound smaller, up to noise), so the search bisects (`cswap.bisection`): the
non-critical steps first (the paper's operating point); if they meet the target, between
them and the whole plan, otherwise below them. About 2 + log2(steps) replays
(`replays_at_most`), each recorded in the trace (steps, share removed, validation metric,
drop, bound, worst class). With `prefer: fastest`, every prefix found to meet the target is
timed against the original, in turns (`cswap.metrics.latencies_ms`), and the fastest is kept.
No prefix meeting the target keeps the unpruned model (0 steps), with a message saying why.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from . import registry
from .bisection import smallest_prefix
from .errors import ConfigError
from .interfaces import Outcomes, Task
from .metrics import latencies_ms
from .options import Target
from .quality import QualityCheck, check, class_report, samples_needed, shortfall

log = logging.getLogger("cswap")


def replays_at_most(steps: int) -> int:
    """Replays a search over a plan of `steps` steps takes at most: the non-critical point,
    the far end of its half, then a bisection of it."""
    return 2 + math.ceil(math.log2(max(steps, 1)))


def refuse_unless_measurable(task: Task, target: Target) -> None:
    """A one-line `ConfigError` naming the task when it cannot check `target`: no per-sample
    outcomes (`Task.measures_outcomes`), or no per-class metric for `max_class_drop`."""
    if target.kind != "quality":
        return
    name = registry.registered_name("tasks", type(task)) or type(task).__name__
    if not task.measures_outcomes:
        raise ConfigError(f"task {name!r} declares no per-sample outcomes (Task.outcomes), so a quality target "
                          "(max_drop, max_class_drop) cannot be checked on it; give params_ratio, flops_ratio or "
                          "latency_ratio")
    if target.max_class_drop is not None and not task.per_class_metric:
        raise ConfigError(f"task {name!r} declares no per-class metric, so max_class_drop cannot be checked on it; "
                          "give max_drop alone")


@dataclass
class QualitySearch:
    """The prefix a quality target chose, and every replay on the way (written to report.json)."""

    steps: int
    plan_steps: int
    target: str  # the target in words
    validation_samples: int
    method: str  # of the bound: exact or bootstrap (cswap.quality)
    chosen: dict  # the chosen prefix's check against the original (QualityCheck.to_json), on validation data
    trace: list[dict] = field(default_factory=list)
    replays: int = 0
    seconds: float = 0.0
    message: str | None = None  # why the unpruned model was kept, when it was
    fastest: list[dict] | None = None  # prefer fastest: every candidate timed (steps, ms, speed-up)

    def to_json(self) -> dict:
        return asdict(self)


def quality_search(plan, target: Target, before: Outcomes, measure: Callable[[int], tuple[Outcomes, float]],
                   *, shapes: Callable[[int], nn.Module] | None = None, original: nn.Module | None = None,
                   timing: Callable[[], torch.Tensor] | None = None, seed: int = 0) -> QualitySearch:
    """The largest prefix of `plan` whose replay meets `target`: `before` are the original's
    validation outcomes, `measure(k)` replays k steps and returns the pruned model's outcomes
    on the same samples and the share of parameters removed. `prefer: fastest` times
    `shapes(k)` against `original` on `timing()`."""
    started = time.perf_counter()
    bounds = (target.max_drop, target.max_class_drop, target.confidence)
    checks: dict[int, QualityCheck] = {0: check(before, before, *bounds, seed=seed)}  # the unpruned model itself
    trace = [_entry(0, checks[0], 0.0, 0.0, replayed=False)]

    def met(k: int) -> bool:
        if k not in checks:
            t0 = time.perf_counter()
            after, share = measure(k)
            checks[k] = check(before, after, *bounds, seed=seed)
            trace.append(_entry(k, checks[k], share, time.perf_counter() - t0))
            log.info("quality search: %d steps, %.1f %% removed: drop %.2f pt, bound %.2f pt (%s)", k, 100 * share,
                     checks[k].overall.drop, checks[k].overall.bound, "met" if checks[k].met else "not met")
        return checks[k].met

    n, m0 = len(plan.steps), plan.num_noncritical
    lo, hi = (m0, n) if m0 == 0 or met(m0) else (0, m0 - 1)  # met(lo), or lo = 0: the unpruned model
    k = lo
    if hi > lo:  # every m the bisection found failing has a met m - 1 before it (or lo)
        first_failing = smallest_prefix(lambda m: not met(m), lo + 1, hi)
        k = hi if first_failing is None else first_failing - 1
    fastest = None
    if target.prefer == "fastest":
        k, fastest = _fastest([m for m, c in checks.items() if c.met and m > 0] or [k], shapes, original, timing)
    message = None if k > 0 else _kept_unpruned(target, checks, len(before))
    if message:
        log.warning(message)
        warnings.warn(message)
    return QualitySearch(k, n, target.describe(), len(before), checks[0].method, checks[k].to_json(),
                         sorted(trace, key=lambda e: e["steps"]), len(trace) - 1,
                         round(time.perf_counter() - started, 3), message, fastest)


def _entry(k: int, result: QualityCheck, share: float, seconds: float, replayed: bool = True) -> dict:
    worst = result.worst_class()
    return {"steps": k, "params_removed_ratio": round(share, 6), "metric": round(result.overall.after, 6),
            "drop": round(result.overall.drop, 4), "bound": round(result.overall.bound, 4), "met": result.met,
            "worst_class": None if worst is None else {"class": worst, "name": result.name_of(worst),
                                                       "drop": round(result.classes[worst].drop, 4),
                                                       "bound": round(result.classes[worst].bound, 4)},
            "seconds": round(seconds, 3), "replayed": replayed}


def _fastest(candidates: list[int], shapes, original: nn.Module, timing) -> tuple[int, list[dict]]:
    """The candidate whose removed model runs fastest, all timed in turns with the original
    (ties: the larger prefix)."""
    if candidates == [0]:
        return 0, []
    ms = latencies_ms([original] + [shapes(k) for k in candidates], timing())
    timed = [{"steps": k, "latency_ms": round(t, 4), "speedup": round(ms[0] / t, 4)}
             for k, t in zip(candidates, ms[1:])]
    best = min(timed, key=lambda r: (r["latency_ms"], -r["steps"]))
    return best["steps"], timed


def _kept_unpruned(target: Target, checks: dict[int, QualityCheck], samples: int) -> str:
    """Why no prefix met the target: the closest try, and a sample size too small to ever meet it."""
    tried = [(k, c) for k, c in checks.items() if k > 0]
    closest = min(tried, key=lambda kc: kc[1].overall.bound, default=None)
    why = shortfall(checks[0], target.max_drop, target.max_class_drop, target.confidence)
    return (f"no prefix of the plan meets {target.describe()} on {samples} validation samples: the unpruned model "
            "is kept (0 steps)"
            + (f"; the closest, {closest[0]} steps, dropped {closest[1].overall.drop:.2f} points (bound "
               f"{closest[1].overall.bound:.2f})" if closest else "")
            + "".join(f"; {line}" for line in why))


def quality_report(search: dict, target: Target, before: Outcomes, after: Outcomes, params_removed: float,
                   speedup: float) -> dict:
    """report.json's `quality`: the target, the chosen prefix's check on validation data (the
    search's), the test split measured at that point (`before`/`after`: the evaluation split's
    outcomes; never used to choose), the worst class on both, the measured speed-up, and the
    search's trace."""
    test = class_report(before, after)
    chosen, worst = search["chosen"], search["chosen"]["worst_class"]
    return {
        "target": target.describe(), "max_drop": target.max_drop, "max_class_drop": target.max_class_drop,
        "confidence": target.confidence, "prefer": target.prefer, "latency_batch": target.latency_batch,
        "method": search["method"], "validation_samples": search["validation_samples"], "steps": search["steps"],
        "plan_steps": search["plan_steps"], "params_removed_ratio": params_removed,
        "speedup_batch1": round(speedup, 4), "validation": chosen, "test": test,
        "worst_class": None if worst is None else {
            "class": worst["class"], "name": worst["name"], "validation_drop": worst["drop"],
            "validation_bound": worst["bound"], "test_drop": test["classes"].get(str(worst["class"]), {}).get("drop")},
        "samples_needed": {n: samples_needed(getattr(target, n), target.confidence)
                           for n in ("max_drop", "max_class_drop")
                           if getattr(target, n) is not None and search["method"] == "exact"},
        "replays": search["replays"], "search_seconds": search["seconds"], "message": search["message"],
        "fastest": search["fastest"], "trace": search["trace"],
    }
