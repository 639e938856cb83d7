"""The Python API: `analyze` a model on data and get a `PruningPlan` back.

`analyze` takes what the analysis reads and nothing else: a replay setting (a target, its
alignment or its recovery) is refused naming where it belongs, `plan.apply(model, ...)`, so
nothing a user passes is silently ignored. The test, scorer and options are validated by the
same models a config is (a registered plugin's `Options`, `AnalysisOptions`).
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from . import registry
from .build import analysis_for
from .coverage import check_coverage
from .errors import ConfigError, validation_summary
from .interfaces import SignificanceTest, Task
from .options import AnalysisOptions, Target, preset_section
from .plan import PruningPlan
from .pruner import progressive_prune


def analyze(
    model: nn.Module,
    data: Task | tuple[torch.Tensor, torch.Tensor],
    *,
    samples_per_class: int | None = None,
    alpha: float | None = None,
    test: str | SignificanceTest | None = None,
    test_options: dict[str, Any] | None = None,
    scorer: str | None = None,
    adapter: str = "auto",
    task: str = "classification",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    options: AnalysisOptions | None = None,
    preset: str | None = None,
    **analysis_options: Any,
) -> PruningPlan:
    """Run progressive C-SWAP (Algorithm 1) and return the plan; `model` is left unchanged.

    `data` is a Task, or `(inputs, targets)` tensors from which the registered task `task`
    (one that `accepts_tensors`) draws S, `samples_per_class` (default 128) of every class,
    seeded. `test` is the significance test: a registered name (default: the task's) built
    with `test_options`, or an instance; `alpha` sets its level. The analysis options are
    `options`, or keyword arguments of `cswap.AnalysisOptions` (`engine`, `unit_batch`,
    `intervention`, ...). `preset` (e.g. "paper") starts the options and the test's options
    from a named preset (`cswap.options.PRESETS`); what is given explicitly wins. How far to
    prune and how to repair is the replay's: `plan.apply(model, params_ratio=..., data=...)`.
    """
    options = _analysis_options(options, preset, analysis_options)
    if preset is not None:
        test_options = {**preset_section(preset, "test.options"), **(test_options or {})}
    the_task = data if isinstance(data, Task) else _tensor_task(task, *data, samples_per_class or 128)
    the_test = _test(test, test_options, the_task, alpha)
    analysis = analysis_for(model, the_task, scorer=scorer, test=the_test, adapter=adapter, options=options,
                            device=device, progress=progress)
    manifold = the_task.manifold(seed, samples_per_class)
    check_coverage(the_task, manifold, model, analysis.example_inputs)  # S must hold every class the model predicts
    ranking = progressive_prune(analysis, seed, manifold=manifold, samples_per_class=samples_per_class)
    return PruningPlan.from_analysis(analysis, ranking)


def _analysis_options(options: AnalysisOptions | None, preset: str | None, given: dict) -> AnalysisOptions:
    """The analysis options from `options` or keywords (a preset underneath); a target setting
    or an unknown name is one line saying where it belongs."""
    if options is not None:  # e.g. a config's PruningOptions: its target part must be the default
        dumped = options.model_dump()
        given_target = {k: dumped[k] for k in Target.model_fields if k in dumped}
        default = Target().model_dump()
        given = {**given, **{k: v for k, v in given_target.items() if v != default[k]}}
        options = AnalysisOptions(**{k: dumped[k] for k in AnalysisOptions.model_fields if k in dumped})
    misplaced = sorted(set(given) & set(Target.model_fields))
    if misplaced:
        raise ConfigError(f"{', '.join(misplaced)}: a replay setting, not an analysis option; cswap.analyze ignores "
                          f"nothing, so give it where the plan becomes a model: plan.apply(model, "
                          f"{misplaced[0]}=..., data=...) or cswap.save_pruned(...)")
    if options is not None and given:
        raise ConfigError(f"give options= or keyword options ({', '.join(sorted(given))}), not both")
    try:
        if options is not None:
            return options
        base = preset_section(preset, "pruning") if preset is not None else {}
        base = {k: v for k, v in base.items() if k in AnalysisOptions.model_fields}
        return AnalysisOptions(**{**base, **given})
    except ValidationError as exc:
        raise ConfigError("invalid analysis options: " + validation_summary(exc)) from None
    except ValueError as exc:  # an unknown preset
        raise ConfigError(str(exc)) from None


def _test(test: str | SignificanceTest | None, options: dict | None, task: Task,
          alpha: float | None) -> SignificanceTest:
    """The significance test: an instance as given, or the registered one built with its options."""
    if isinstance(test, SignificanceTest):
        if options:
            raise ConfigError("test_options apply to a test given by name; configure the instance itself")
        the_test = test
    else:
        the_test = registry.create("tests", test or task.default_test, options)
    return the_test if alpha is None else the_test.with_alpha(alpha)


def _tensor_task(name: str, inputs: torch.Tensor, targets: torch.Tensor, samples_per_class: int) -> Task:
    cls = registry.load("tasks", name)
    if not cls.accepts_tensors:
        raise ConfigError(f"task {name!r} cannot be built from tensors; pass a Task, or a task that accepts tensors")
    return cls.from_tensors(inputs, targets, samples_per_class)
