"""Every way a plan becomes a model: (plan, target, model, data) -> the pruned model.

`cswap prune`, `cswap curve`/`sweep`, the demo, `plan.apply`, `save_pruned`/`load_pruned`,
the latency search and export all come here, so they agree on what a target means. Three
steps, each in one place:

1. How many steps (`steps_for`): no target means the non-critical steps (the paper's
   C-SWAP); a parameter share is counted on the plan's ledger, or on the pruned shapes when
   widths are aligned; a MAC share on the pruned shapes; a speed-up by `cswap.latency`'s
   table and measurements; a quality target (a bounded drop of the task's metric) by replays
   measured on validation data (`cswap.quality_search`). Every search is `cswap.bisection`'s.
2. Which units (`cswap.alignment.prefix_units`): the steps' own, or aligned to `round_to`.
3. The model (`replay_steps`): a plain replay removes the units physically. A plan whose
   cuts were compensated, or a target with recovery, goes through the cut model first: a
   copy of the unpruned model with the units cut, in plan order, by the analysis's own
   intervention (its statistics from the same S), then repaired in place (`cswap.recovery`),
   then removed. The cut model keeps the unpruned numbering, so every compensation and
   repair lands on the right weights, and it stays the reference the pruned model is
   checked against (cut == removal).

The target's `round_to` and `recovery` are read here and nowhere else; the data a replay
needs (S, calibration, a quality target's validation data) is resolved here too (`replay_data`).
"""
from __future__ import annotations

import copy
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from . import registry
from .alignment import prefix_units
from .bisection import smallest_prefix
from .build import units_of
from .compensation import make_intervention
from .errors import ConfigError, ModelError, validation_summary
from .interfaces import RANKED, ArchitectureAdapter, Manifold, Task, Unit, UnitGraph
from .metrics import count_macs
from .options import AnalysisOptions, Target, check_recovery_fits
from .recovery import RecoveryReport, recover
from .removal import count_params, remove_units

log = logging.getLogger("cswap")


@dataclass
class ReplayData:
    """What a replay compensates and repairs on: the analysis's S (a compensated plan's
    statistics) and the calibration set of a recovery (S, or a larger draw from S's split:
    never the evaluation data); for a quality target, the validation data it is checked on
    (apart from both and from the evaluation data: `Task.validation`) and the task that
    measures it."""

    sample_set: Manifold | None = None
    calibration: Manifold | None = None
    validation: Manifold | None = None
    task: Task | None = None

    @classmethod
    def for_task(cls, task: Task, plan, target: Target, sample_set: Manifold | None = None,
                 validation: Manifold | None = None) -> "ReplayData":
        """S drawn again from `task` as the analysis drew it (the plan's seed and M_k) unless
        given, the calibration set the target's recovery asks for, and a quality target's
        validation data (drawn apart from both unless given)."""
        return cls.drawn(task, plan.seed or 0, plan.samples_per_class, target, sample_set, validation)

    @classmethod
    def drawn(cls, task: Task, seed: int, samples_per_class: int | None, target: Target,
              sample_set: Manifold | None = None, validation: Manifold | None = None) -> "ReplayData":
        """`for_task` before there is a plan: S of `seed` and `samples_per_class` (None: the
        task's own), as `cswap prune` draws it before the analysis."""
        sample_set = sample_set if sample_set is not None else task.manifold(seed, samples_per_class)
        more = target.recovery.calibration_samples_per_class
        calibration = sample_set if more is None or not target.recovery.methods else task.manifold(seed, more)
        if validation is None and target.kind == "quality":
            validation = validation_for(task, seed, target, [sample_set, calibration])
        return cls(sample_set, calibration, validation, task)


def validation_for(task: Task, seed: int, target: Target, avoid: list[Manifold]) -> Manifold:
    """The validation data of a quality target, or a one-line refusal naming the task."""
    from .quality_search import refuse_unless_measurable

    refuse_unless_measurable(task, target)
    return task.validation(seed, avoid, target.validation_per_class)


@dataclass
class Pruned:
    """A replay's result: the pruned model and how it was made."""

    model: nn.Module
    steps: int  # leading steps of the plan replayed (before alignment)
    units: list[Unit]  # the units removed, in plan order
    target: Target
    cut: nn.Module | None  # the unpruned architecture with the same cuts and repairs (None: not built)
    recovery: RecoveryReport | None
    search: dict | None  # a latency or quality target's search (`LatencySearch`, `QualitySearch`)
    seconds: float


def target_of(target: Target | dict | None = None, **fields) -> Target:
    """A `Target` from a Target, a dict of its fields, or keywords (`params_ratio=0.5`); a field
    that is not a target's is refused naming where it belongs."""
    if target is not None and fields:
        raise ConfigError("give a Target or its fields as keywords, not both")
    given = target.model_dump() if isinstance(target, Target) else dict(target or fields)
    analysis_only = sorted(set(given) & set(AnalysisOptions.model_fields))
    if analysis_only:
        raise ConfigError(f"{', '.join(analysis_only)}: analysis options, not target settings; give them to "
                          "cswap.analyze (or the config's pruning section)")
    try:
        return Target(**given)
    except ValidationError as exc:
        raise ConfigError("invalid target: " + validation_summary(exc)) from None


def prune(plan, model: nn.Module, target: Target | None = None, data=None, *, adapter: ArchitectureAdapter | None = None,
          graph: UnitGraph | None = None, latency_cache: str | Path | None = None, latency_backend: str = "torch",
          keep_cut: bool = False, progress: bool = False) -> Pruned:
    """The pruned copy of `model` (unpruned, never changed) for `target` (default: the
    non-critical steps, recovered as the default target says). `data` is what the replay
    compensates and repairs on: a `ReplayData`, the analysis's `Task` or `(inputs, targets)`
    (S drawn again with the plan's seed), or S itself (a `Manifold`). `keep_cut` keeps the cut
    model even for a plain replay (the run's self-check compares the two). A latency target is
    measured in `latency_backend` (`cswap.backends`), its table cached in `latency_cache`."""
    started = time.perf_counter()
    target = target if target is not None else Target()
    adapter = adapter_of(plan, adapter)
    check_model(plan, model)
    data = replay_data(plan, target, data)  # refused before any work
    k, search = steps_for(plan, model, target, adapter, latency_cache, data=data, graph=graph,
                          latency_backend=latency_backend)
    pruned = replay_steps(plan, model, k, target, data, adapter=adapter, graph=graph, keep_cut=keep_cut,
                          progress=progress)
    pruned.search, pruned.seconds = search, time.perf_counter() - started
    return pruned


def adapter_of(plan, adapter: ArchitectureAdapter | None = None) -> ArchitectureAdapter:
    """The adapter a replay removes with: the given one, or the plan's by its registered name."""
    return adapter if adapter is not None else registry.create("adapters", plan.adapter)


def check_model(plan, model: nn.Module) -> None:
    if count_params(model) != plan.params_total:
        raise ModelError(f"the plan was made for a model with {plan.params_total} parameters, "
                         f"this one has {count_params(model)}")


def replay_data(plan, target: Target, data) -> ReplayData:
    """`data` as the `ReplayData` this replay needs, or a one-line refusal saying what to pass."""
    if isinstance(data, ReplayData):
        resolved = data
    elif isinstance(data, Manifold):
        if target.recovery.calibration_samples_per_class is not None:
            raise ConfigError("calibration_samples_per_class draws calibration data from the task: pass the task "
                              "as data, not the sample set")
        resolved = ReplayData(data, data)
    elif isinstance(data, Task):
        resolved = ReplayData.for_task(data, plan, target)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        if target.kind == "quality":
            raise ConfigError("a quality target is checked on validation data apart from the evaluation data, which "
                              "(inputs, targets) alone do not give: pass data=ClassificationTask.from_tensors(inputs, "
                              "targets, samples_per_class, test=(test_inputs, test_targets))")
        task = registry.load("tasks", "classification").from_tensors(*data, plan.samples_per_class or 128)
        resolved = ReplayData.for_task(task, plan, target)
    elif data is None:
        resolved = ReplayData()
    else:
        raise ConfigError(f"replay data must be a Task, (inputs, targets) tensors or a Manifold, not "
                          f"{type(data).__name__}")
    _check_data(plan, target, resolved)
    return resolved


def _check_data(plan, target: Target, data: ReplayData) -> None:
    try:
        check_recovery_fits(plan.intervention, target.recovery)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if plan.compensated and data.sample_set is None:
        raise ConfigError(f"this plan's cuts were compensated (intervention {plan.intervention}); replaying it needs "
                          "the data it was analysed with: data=task (or (inputs, targets))")
    if target.recovery.methods and data.calibration is None:
        raise ConfigError(f"recovery {target.recovery.method} repairs the pruned model on calibration data: pass "
                          "data=task (or (inputs, targets)), the data the plan was analysed with, or give "
                          "recovery='none'")
    if target.kind == "quality" and (data.validation is None or data.task is None):
        raise ConfigError(f"a quality target ({target.describe()}) is checked on validation data the task draws "
                          "apart from S and the evaluation data: pass data=task, the task the plan was analysed with")


# ---- 1. how many steps ---------------------------------------------------------------

def steps_for(plan, model: nn.Module, target: Target, adapter: ArchitectureAdapter,
              latency_cache: str | Path | None = None, *, data: ReplayData | None = None,
              graph: UnitGraph | None = None, latency_backend: str = "torch") -> tuple[int, dict | None]:
    """The plan's prefix length for `target`, and a latency or quality target's search trace
    (a quality target replays on `data`: its validation set and task)."""
    kind = target.kind
    if kind == "quality":
        return _quality_steps(plan, model, target, adapter, data if data is not None else ReplayData(), graph)
    if kind is None:
        if plan.num_noncritical == 0 and plan.steps and plan.steps[0].phase == RANKED:
            raise ConfigError(f"the {plan.method} plan is a ranking: give params_ratio, flops_ratio or latency_ratio")
        return plan.num_noncritical, None
    if kind == "latency_ratio":
        return _latency_steps(plan, model, target, adapter, latency_cache, latency_backend)
    share, n = getattr(target, kind), len(plan.steps)
    if kind == "params_ratio" and not target.round_to:  # the ledger counts every prefix exactly
        removed = plan.cumulative_params_removed()
        reaches = lambda m: removed[m] >= share * plan.params_total - 1e-9  # noqa: E731
    else:  # counted on the replayed shapes (aligned sets are not prefixes of the ledger's steps)
        x = plan.example_inputs(next(model.parameters()).device)
        count = count_params if kind == "params_ratio" else (lambda m: count_macs(m, x))
        full = count(model)
        reaches = lambda m: full - count(removed_model(plan, model, m, target, adapter)) >= share * full - 1e-9  # noqa: E731
    k = smallest_prefix(reaches, 0, n)
    if k is None:
        msg = f"{kind} {share:.3f} is beyond what this plan can remove; replaying all {n} steps"
        log.warning(msg)
        warnings.warn(msg)
        return n, None
    return k, None


def _latency_steps(plan, model: nn.Module, target: Target, adapter, cache, backend: str) -> tuple[int, dict]:
    from .latency import latency_search, table_for

    table = table_for(plan, model, target.latency_batch, cache=cache, adapter=adapter, round_to=target.round_to,
                      backend=backend)
    search = latency_search(plan, model, target.latency_ratio, table, adapter=adapter, round_to=target.round_to,
                            backend=backend)
    log.info("latency target x%.2f: %d steps, predicted x%.2f, measured x%.2f", target.latency_ratio, search.steps,
             search.predicted_speedup, search.measured_speedup)
    return search.steps, search.to_json()


def _quality_steps(plan, model: nn.Module, target: Target, adapter, data: ReplayData, graph) -> tuple[int, dict]:
    """The largest prefix whose replay meets the quality target on `data.validation`
    (`cswap.quality_search`): each candidate replayed as deployed, with the target's recovery."""
    from .latency import timing_inputs
    from .quality_search import quality_search

    _check_data(plan, target, data)
    device = next(model.parameters()).device
    if graph is None and (plan.compensated or target.recovery.methods):
        graph = _units_of(adapter, model, plan)  # traced once for every replay of the search

    def measure(k: int):
        pruned = replay_steps(plan, model, k, target, data, adapter=adapter, graph=graph).model
        return data.task.outcomes(pruned, device, data.validation), 1 - count_params(pruned) / plan.params_total

    search = quality_search(plan, target, data.task.outcomes(model, device, data.validation), measure,
                            shapes=lambda k: removed_model(plan, model, k, target, adapter), original=model,
                            timing=lambda: timing_inputs(plan, device, target.latency_batch), seed=plan.seed or 0)
    log.info("quality target %s: %d steps after %d replays (%.1f s)", target.describe(), search.steps, search.replays,
             search.seconds)
    return search.steps, search.to_json()


# ---- 2. and 3. which units, and the model ----------------------------------------------

def removed_units(plan, k: int, target: Target) -> list[Unit]:
    """The units a replay of the first `k` steps removes (aligned to the target's `round_to`)."""
    return prefix_units(plan.steps, plan.layers, k, target.round_to)


def removed_model(plan, model: nn.Module, k: int, target: Target, adapter: ArchitectureAdapter, *,
                  inplace: bool = False) -> nn.Module:
    """The first `k` steps removed physically from `model` (a copy unless `inplace`): the
    shapes only, with no compensation and no recovery (what a loader fills with saved weights)."""
    return remove_units(model if inplace else copy.deepcopy(model), removed_units(plan, k, target), adapter,
                        plan.input_shape)


def steps_matching(plan, model: nn.Module, target: Target, pruned: nn.Module, adapter: ArchitectureAdapter) -> int:
    """The step count whose replay to `target` has exactly `pruned`'s shapes (a model an
    earlier replay made: nothing is measured again), or a `ModelError`."""
    size = count_params(pruned)
    k = smallest_prefix(lambda m: count_params(removed_model(plan, model, m, target, adapter)) <= size,
                        0, len(plan.steps))  # more steps never leave more parameters
    if k is not None:
        expected = removed_model(plan, model, k, target, adapter).state_dict()
        theirs = pruned.state_dict()
        wrong = [key for key in expected if key not in theirs or theirs[key].shape != expected[key].shape]
        if not wrong and not set(theirs) - set(expected):
            return k
    raise ModelError(f"the model given as pruned is no replay of this plan to {target.kind or 'its non-critical steps'}"
                     f"{' with round_to ' + str(target.round_to) if target.round_to else ''}: its shapes match no "
                     "prefix of the plan")


def replay_steps(plan, model: nn.Module, k: int, target: Target, data: ReplayData, *, adapter: ArchitectureAdapter,
                 graph: UnitGraph | None = None, keep_cut: bool = False, progress: bool = False) -> Pruned:
    """The first `k` steps of `plan` removed from a copy of `model`, compensated as the
    analysis cut, repaired as `target.recovery` says (see the module docstring)."""
    started = time.perf_counter()
    units = removed_units(plan, k, target)
    methods = target.recovery.methods
    if not (plan.compensated or methods or keep_cut):
        pruned = removed_model(plan, model, k, target, adapter)
        return Pruned(pruned, k, units, target, None, None, None, time.perf_counter() - started)
    _check_data(plan, target, data)
    graph = graph or _units_of(adapter, model, plan)
    ridge = plan.ridge if plan.ridge is not None else AnalysisOptions().ridge
    cut = copy.deepcopy(model).eval()
    intervention = make_intervention(plan.intervention, cut, graph, model, data.sample_set, ridge=ridge)
    for unit in units:  # in plan order: compensations follow one another as in the analysis
        intervention.cut(unit)
    report = None
    if methods:
        report = recover(cut, model, graph, units, [x for x, _ in data.calibration], methods,
                         sequential=target.recovery.sequential, ridge=ridge, progress=progress)
    pruned = remove_units(copy.deepcopy(cut), units, adapter, plan.input_shape)
    return Pruned(pruned, k, units, target, cut, report, None, time.perf_counter() - started)


def _units_of(adapter: ArchitectureAdapter, model: nn.Module, plan) -> UnitGraph:
    p = next(model.parameters())
    with torch.no_grad():
        return units_of(adapter, model, plan.example_inputs(p.device, p.dtype), verify=False)
