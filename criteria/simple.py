"""The two reference baselines of the paper: random pruning and one-shot magnitude (OMP)."""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch_pruning as tp

from cswap.discovery import build_dependency_graph
from cswap.errors import ModelError
from cswap.interfaces import Analysis
from cswap.ranking import RankingOptions

from .base import RankingCriterion


class RandomCriterion(RankingCriterion):
    """Units in a uniformly random global order, drawn from the seed (the floor any method must beat)."""

    name = "random"

    def scores(self, analysis: Analysis, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, 0x5EED])
        return {layer.name: rng.random(layer.channels) for layer in analysis.units.layers}


class MagnitudeCriterion(RankingCriterion):
    """OMP: the L1 or L2 norm of each unit's weights across its whole dependency group.

    Uses torch-pruning's `GroupMagnitudeImportance` on the same DependencyGraph groups that
    `cswap.discovery.discover` turns into layers (our layer name is the group's root module), so
    a residual-stream unit is scored by all the coupled slices that removing it deletes.
    torch-pruning's own per-group normaliser is switched off: `normalize` (none | layer) is
    ours, applied the same way for every criterion.
    """

    name = "magnitude"

    class Options(RankingOptions):
        p: Literal[1, 2] = 2
        group_reduction: Literal["mean", "sum", "max"] = "mean"

    def scores(self, analysis: Analysis, seed: int) -> dict[str, np.ndarray]:
        model, units = analysis.model, analysis.units
        if analysis.adapter.removes_units:  # e.g. ViT heads: not channels torch-pruning can group
            raise ModelError(f"criterion magnitude scores torch-pruning channel groups; adapter "
                             f"{analysis.adapter_name} prunes units of its own (e.g. attention heads): use random, "
                             "amp, cswap or an attribution criterion")
        importance = tp.importance.GroupMagnitudeImportance(
            p=self.options.p, group_reduction=self.options.group_reduction, normalizer=None)
        x = torch.zeros((1, *units.input_shape), device=next(model.parameters()).device)
        dg = build_dependency_graph(model, x)
        out = {}
        for layer in units.layers:
            module = model.get_submodule(layer.name)
            pruner = dg.get_pruner_of_module(module)
            group = dg.get_pruning_group(module, pruner.prune_out_channels, list(range(layer.channels)))
            with torch.no_grad():
                values = importance(group)
            if values is None or values.numel() != layer.channels:
                raise ModelError(f"torch-pruning gave no magnitude for every channel of {layer.name!r}")
            out[layer.name] = values.detach().cpu().numpy()
        return out
