"""What every ranking criterion shares: options, global ranking, and the plan it returns.

A baseline criterion scores each unit once on the unpruned model (higher = more important),
and the plan removes units from the least to the most important, *globally* across layers,
as the paper's baselines do. Scales differ between layers for most scores (a gradient at the
stem is not comparable with one at the last block), so `normalize: layer` divides every
score by the mean |score| of its layer first; it is an option because the paper ranks raw
scores, and the benchmark reports both.

Ties (a dead unit scores 0 under most criteria) are broken by a seeded permutation, so the
seed changes only what the scores leave undecided.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from cswap import registry
from cswap.errors import ModelError
from cswap.interfaces import Criterion, Manifold, ScoringFunction, SignificanceTest, Task
from cswap.plan import RANKED, PlanStep, PruningPlan
from cswap.units import Layer, Unit, UnitGraph


class RankingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normalize: Literal["none", "layer"] = "none"


class RankingCriterion(Criterion):
    """Base of the one-shot baselines: subclasses implement `scores`, this makes the plan."""

    name = "ranking"
    Options = RankingOptions

    def __init__(self, options=None, *, adapter: str = "generic", device: torch.device | str = "cpu",
                 progress: bool = False, **context):
        self.options = options or self.Options()
        self.adapter = adapter
        self.device = torch.device(device)
        self.progress = progress
        self.context = context

    def scores(self, model: nn.Module, units: UnitGraph, task: Task, seed: int) -> dict[str, np.ndarray]:
        """Importance of every unit, by layer name (one value per channel; higher = keep)."""
        raise NotImplementedError

    def plan(self, model: nn.Module, units: UnitGraph, task: Task, seed: int) -> PruningPlan:
        model.eval()
        per_layer = self.scores(model, units, task, seed)
        steps = rank_globally(per_layer, units, seed, normalize=self.options.normalize)
        return PruningPlan.build(model, units, steps, method=self.name, adapter=self.adapter,
                                 meta={"seed": seed, "options": self.options.model_dump()})


def normalize_layer(values: np.ndarray) -> np.ndarray:
    """Divide by the layer's mean |score| so every layer's scores average 1 in magnitude."""
    scale = np.abs(values).mean()
    return values / scale if scale > 0 else values


def rank_globally(per_layer: dict[str, np.ndarray], graph: UnitGraph, seed: int,
                  normalize: str = "none") -> list[PlanStep]:
    """Steps for every unit, least important first; ties in a seeded random order."""
    units: list[Unit] = []
    values: list[float] = []
    for layer in graph.layers:
        if layer.name not in per_layer:
            raise ModelError(f"no scores for layer {layer.name!r}")
        v = np.asarray(per_layer[layer.name], dtype=np.float64).reshape(-1)
        if v.shape[0] != layer.channels:
            raise ModelError(f"layer {layer.name!r}: {v.shape[0]} scores for {layer.channels} channels")
        if not np.isfinite(v).all():
            raise ModelError(f"layer {layer.name!r}: non-finite importance scores")
        if normalize == "layer":
            v = normalize_layer(v)
        units += layer.units()
        values += v.tolist()
    order = np.random.default_rng(seed).permutation(len(units))
    order = order[np.argsort(np.asarray(values)[order], kind="stable")]
    return [PlanStep(units[i], RANKED, score=float(values[i])) for i in order]


# ---- helpers shared by the criteria that run the model on S --------------------------------

def task_scorer_and_test(task: Task, context: dict, test_options: dict) -> tuple[ScoringFunction, SignificanceTest]:
    """The scorer and the significance test: given by the caller (context) or the task's defaults."""
    scorer = context.get("scorer") or registry.create("scorers", task.default_scorer)
    test = context.get("test") or registry.create("tests", task.default_test, test_options)
    return scorer, test


def manifold_on(task: Task, seed: int, device: torch.device) -> Manifold:
    m = task.manifold(seed)
    return Manifold([(x.to(device), y.to(device) if torch.is_tensor(y) else y) for x, y in m.batches],
                    m.class_counts)


def channel_sources(model: nn.Module, layer: Layer) -> list[nn.Module]:
    """Modules whose outputs carry the layer's channels, index for index.

    A plain group has one producer (its root convolution). A residual stream is written by
    several convolutions (the stem or shortcut, and each block's last convolution), all added
    into the same channels: removing the unit removes all of them, so attribution criteria sum
    their per-channel attributions over these producers. Found from the group's out-channel
    weight slices; depthwise convolutions pass a channel through rather than produce it, and a
    producer whose width differs from the group's (a concatenation) cannot be mapped index for
    index, so both are left out. The root module is always included.
    """
    modules = dict(model.named_modules())
    root = modules[layer.name]
    found = [root]
    for pname, dim, _ in layer.frees:
        if dim != 0 or not pname.endswith(".weight"):
            continue
        module = modules.get(pname[: -len(".weight")])
        if module is None or module in found:
            continue
        if isinstance(module, nn.Conv2d | nn.Conv1d | nn.Conv3d) and module.groups == 1 and module.out_channels == layer.channels:
            found.append(module)
        elif isinstance(module, nn.Linear) and module.out_features == layer.channels:
            found.append(module)
    return found


def reduce_per_channel(attribution: torch.Tensor) -> torch.Tensor:
    """|attribution| summed over every axis but the channel axis (1): shape (channels,)."""
    a = attribution.detach().abs()
    if a.dim() < 2:
        raise ModelError(f"attribution of shape {tuple(a.shape)} has no channel axis")
    return a.transpose(0, 1).reshape(a.shape[1], -1).sum(dim=1)
