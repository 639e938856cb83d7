"""What every baseline criterion shares: a global ranking of per-unit scores, and the
helpers of the criteria that attribute to channels.

A baseline scores each unit once on the unpruned model (higher = more important) and the
ranking removes units from the least to the most important, *globally* across layers, as the
paper's baselines do (`cswap.ranking`: options, per-layer normalisation, seeded ties).
"""
from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch
from torch import nn

from cswap.errors import ModelError
from cswap.interfaces import Analysis, Criterion, Layer, Ranking
from cswap.ranking import RankingOptions, rank_globally


class RankingCriterion(Criterion):
    """Base of the one-shot baselines: subclasses implement `scores`, this ranks the units
    globally (`cswap.ranking.rank_globally`)."""

    name = "ranking"
    Options = RankingOptions

    @abstractmethod
    def scores(self, analysis: Analysis, seed: int) -> dict[str, np.ndarray]:
        """Importance of every unit, by layer name (one value per channel; higher = keep)."""

    def rank(self, analysis: Analysis, seed: int) -> Ranking:
        analysis.model.eval()
        steps = rank_globally(self.scores(analysis, seed), analysis.units, seed, normalize=self.options.normalize)
        return Ranking(self.name, steps, meta={"options": self.options.model_dump()}, seed=seed)


# ---- helpers of the criteria that attribute to channels ----------------------------------

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
