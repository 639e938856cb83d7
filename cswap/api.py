"""The Python API: `analyze` a model on data and get a `PruningPlan` back."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import registry
from .build import resolve_adapter
from .config import PluginRef
from .coverage import check_coverage
from .interfaces import Task
from .plan import PruningPlan
from .pruner import progressive_prune


def analyze(
    model: nn.Module,
    data: Task | tuple[torch.Tensor, torch.Tensor],
    *,
    samples_per_class: int = 128,
    alpha: float = 0.05,
    voting: str = "per_class",
    correction: str = "none",
    test_options: dict[str, Any] | None = None,
    scorer: str | None = None,
    adapter: str = "auto",
    seed: int = 0,
    shuffle_units: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = True,
    engine: str = "auto",
    unit_batch: int | str = 1,
) -> PruningPlan:
    """Run progressive C-SWAP (Algorithm 1) and return the plan; `model` is left unchanged.

    `data` is a Task, or `(inputs, targets)` tensors of a classification problem from which
    S takes `samples_per_class` samples of every class (seeded).
    """
    if isinstance(data, Task):
        task = data
    else:
        inputs, targets = data
        task = registry.create(
            "tasks", "classification",
            {"dataset": "tensors", "samples_per_class": samples_per_class,
             "manifold_split": "train", "eval_split": "train"},
            tensors={"train": (inputs, targets)},
        )
    options = {"alpha": alpha, "voting": voting, "correction": correction, **(test_options or {})}
    test = registry.create("tests", task.default_test, options)
    score_fn = registry.create("scorers", scorer or task.default_scorer)
    adapter_name, adapter_obj = resolve_adapter(PluginRef(name=adapter), model)
    model.eval()
    x = task.example_inputs().to(next(model.parameters()).device)
    graph = adapter_obj.units(model, x).verified(model, adapter_obj, x)
    manifold = task.manifold(seed)
    check_coverage(task, manifold, model, x)  # S must hold every class the model predicts
    return progressive_prune(
        model, graph, manifold, score_fn, test, adapter=adapter_name,
        seed=seed, shuffle_units=shuffle_units, device=device, progress=progress,
        stages=adapter_obj.stages, engine=engine, unit_batch=unit_batch,
    )
