"""Replaying a plan's prefix as the deployed model: compensated, repaired, removed.

A plain plan is replayed by physical removal alone (`PruningPlan.apply_prefix`). A plan whose
cuts were compensated (`meta.intervention: mean | least_squares`) or a replay with recovery
goes through the cut model first: a copy of the unpruned model with the prefix cut, in plan
order, by the same intervention the analysis used (its statistics measured on the same S),
then repaired in place (`cswap.recovery`), then removed physically. The cut model keeps the
unpruned numbering, so every compensation and repair lands on the right weights; removal then
carries them to the smaller model, and the cut model stays the reference the pruned one is
checked against.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from .build import units_of
from .compensation import make_intervention
from .errors import ConfigError
from .interfaces import ArchitectureAdapter, Manifold, UnitGraph
from .options import RecoveryOptions
from .recovery import RecoveryReport, recover


@dataclass
class Replayed:
    pruned: nn.Module
    cut: nn.Module  # the unpruned architecture with the same cuts, compensations and repairs
    recovery: RecoveryReport | None
    seconds: float


def calibration_for(task, seed: int, recovery: RecoveryOptions | None, sample_set: Manifold) -> Manifold:
    """The data a recovery repairs on: S itself, or a larger draw from S's own split
    (`calibration_samples_per_class`): never the evaluation data."""
    if recovery is None or recovery.calibration_samples_per_class is None:
        return sample_set
    return task.manifold(seed, recovery.calibration_samples_per_class)


def needs_cut_model(plan, recovery: RecoveryOptions | None) -> bool:
    return plan.meta.get("intervention", "zero") != "zero" or bool(recovery and recovery.methods)


def replay(plan, model: nn.Module, k: int, *, adapter: ArchitectureAdapter, graph: UnitGraph | None = None,
           sample_set: Manifold | None = None, calibration: Manifold | None = None,
           recovery: RecoveryOptions | None = None, ridge: float = 1e-3, progress: bool = False) -> Replayed:
    """The first `k` steps of `plan` removed from a copy of `model` with the plan's
    compensation (which needs `sample_set`, the S of the analysis) and `recovery` (on
    `calibration`, default S)."""
    started = time.perf_counter()
    kind = plan.meta.get("intervention", "zero")
    if kind != "zero" and sample_set is None:
        raise ConfigError(f"this plan's cuts were compensated (intervention {kind}); replaying it needs the sample "
                          "set S it was analysed with (sample_set=task.manifold(seed))")
    methods = recovery.methods if recovery else ()
    if "bias" in methods and kind != "zero":
        raise ConfigError(f"recovery bias folds the removed units' means, which intervention {kind} already did; "
                          "use least_squares or bn")
    graph = graph or _units_of(adapter, model, plan)
    cut = copy.deepcopy(model).eval()
    intervention = make_intervention(kind, cut, graph, model, sample_set, ridge=ridge)
    for unit in plan.units(k):  # in plan order: compensations follow one another as in the analysis
        intervention.cut(unit)
    report = None
    if methods:
        data = calibration if calibration is not None else sample_set
        if data is None:
            raise ConfigError("recovery needs calibration data (calibration=task.manifold(seed))")
        report = recover(cut, model, graph, plan.units(k), [x for x, _ in data], methods,
                         sequential=recovery.sequential, ridge=ridge, progress=progress)
    pruned = plan.remove(copy.deepcopy(cut), k, adapter)
    return Replayed(pruned, cut, report, time.perf_counter() - started)


def _units_of(adapter: ArchitectureAdapter, model: nn.Module, plan) -> UnitGraph:
    p = next(model.parameters())
    with torch.no_grad():
        return units_of(adapter, model, plan.example_inputs(p.device, p.dtype), verify=False)
