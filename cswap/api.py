"""The Python API: `analyze` a model on data and get a `PruningPlan` back."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import registry
from .build import analysis_for
from .coverage import check_coverage
from .errors import ConfigError
from .interfaces import Task
from .options import PruningOptions, preset_section
from .plan import PruningPlan
from .pruner import progressive_prune


def analyze(
    model: nn.Module,
    data: Task | tuple[torch.Tensor, torch.Tensor],
    *,
    samples_per_class: int | None = None,
    alpha: float | None = None,
    test_options: dict[str, Any] | None = None,
    scorer: str | None = None,
    adapter: str = "auto",
    task: str = "classification",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    options: PruningOptions | None = None,
    preset: str | None = None,
    **pruning: Any,
) -> PruningPlan:
    """Run progressive C-SWAP (Algorithm 1) and return the plan; `model` is left unchanged.

    `data` is a Task, or `(inputs, targets)` tensors from which the registered task `task`
    (one that `accepts_tensors`) draws S, `samples_per_class` (default 128) of every class,
    seeded. `alpha` sets the significance level of the task's test; `test_options` are that
    test's own options. The run's pruning options are `options`, or keyword arguments of
    `cswap.options.PruningOptions` (`engine`, `unit_batch`, `shuffle_units`, `fast`, ...).
    `preset` (e.g. "paper") starts the pruning and test options from a named preset
    (`cswap.options.PRESETS`); what is given explicitly wins.
    """
    if preset is not None:
        test_options = {**preset_section(preset, "test.options"), **(test_options or {})}
        options = options if options is not None else PruningOptions.preset(preset, **pruning)
    options = options if options is not None else PruningOptions(**pruning)
    the_task = data if isinstance(data, Task) else _tensor_task(task, *data, samples_per_class or 128)
    test = registry.create("tests", the_task.default_test, test_options)
    if alpha is not None:
        test = test.with_alpha(alpha)
    analysis = analysis_for(model, the_task, scorer=scorer, test=test, adapter=adapter, options=options,
                            device=device, progress=progress)
    manifold = the_task.manifold(seed, samples_per_class)
    check_coverage(the_task, manifold, model, analysis.example_inputs)  # S must hold every class the model predicts
    ranking = progressive_prune(analysis, seed, manifold=manifold)
    return PruningPlan.from_ranking(model, analysis.units, ranking, adapter=analysis.adapter_name)


def _tensor_task(name: str, inputs: torch.Tensor, targets: torch.Tensor, samples_per_class: int) -> Task:
    cls = registry.load("tasks", name)
    if not cls.accepts_tensors:
        raise ConfigError(f"task {name!r} cannot be built from tensors; pass a Task, or a task that accepts tensors")
    return cls.from_tensors(inputs, targets, samples_per_class)
