"""Captum-based criteria: Integrated Gradients, DeepLIFT, Conductance, Internal Influence.

Each unit is scored by the attribution of its channel at the layer that produces it, with
Captum's layer attribution classes (`LayerIntegratedGradients`, `LayerDeepLift`,
`LayerConductance`, `InternalInfluence`), target = the true class of every sample of S. The
per-unit score is |attribution| summed over the channel's spatial positions and averaged over
the samples: summing over space keeps the completeness property of IG/DeepLIFT (a channel's
share of the output change), so layers of different resolution compare fairly in the global
ranking. Where a residual stream is written by several convolutions, the attributions at all
of them are summed (see `criteria.base.channel_sources`; option `sources: root` uses only
the group's root module, as the brief's simplest reading).

Baselines (IG, DeepLIFT, Conductance) are all-zero inputs, i.e. the dataset mean after the
usual normalisation.

DeepLIFT in Captum keeps per-module state, so it refuses models that call one activation
module twice (torchvision's and our ResNet `BasicBlock.relu`). The criterion therefore runs
on a copy in which each reused activation is given one private copy per call
(`unshare_activations`); the function computed is identical.
"""
from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from cswap.errors import ModelError
from cswap.interfaces import Analysis
from cswap.ranking import RankingOptions

from .base import RankingCriterion, channel_sources, reduce_per_channel

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.ELU, nn.Sigmoid, nn.Tanh, nn.Softmax, nn.LeakyReLU, nn.SiLU,
                nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.PReLU)


class _PerCall(nn.Module):
    """Stands in for an activation module called `n` times per forward: call i uses copy i."""

    def __init__(self, module: nn.Module, n: int):
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(module) for _ in range(n))
        self.calls = 0

    def forward(self, x):
        module = self.copies[self.calls % len(self.copies)]
        self.calls += 1
        return module(x)


def unshare_activations(model: nn.Module, example_inputs: torch.Tensor) -> nn.Module:
    """Give every activation module that one forward pass calls several times one copy per call.

    Activations are stateless and parameter-free (PReLU's copies share no state, but it is
    deep-copied with its weight, so the function is unchanged). The call counters restart at
    every forward of `model`, so calls map to the same copy on every pass.
    """
    counts: dict[nn.Module, int] = {}
    hooks = [m.register_forward_hook(lambda mod, a, o: counts.__setitem__(mod, counts.get(mod, 0) + 1))
             for m in model.modules() if isinstance(m, _ACTIVATIONS)]
    try:
        with torch.no_grad():
            model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
    shared = {m for m, n in counts.items() if n > 1}
    if not shared:
        return model
    wrappers: list[_PerCall] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child in shared:
                wrapper = _PerCall(child, counts[child])
                setattr(parent, name, wrapper)
                wrappers.append(wrapper)

    def reset(*_):
        for w in wrappers:
            w.calls = 0

    model.register_forward_pre_hook(reset)
    return model


class AttributionOptions(RankingOptions):
    sources: Literal["producers", "root"] = "producers"
    n_steps: int = Field(32, ge=2, description="integration steps (IG, Conductance, Internal Influence)")
    internal_batch_size: int | None = Field(256, ge=1, description="inputs per forward inside Captum")


class AttributionCriterion(RankingCriterion):
    """Base of the Captum criteria; subclasses name the Captum class."""

    Options = AttributionOptions
    name = "attribution"
    #: whether `attribute` takes n_steps / internal_batch_size (path-integral methods)
    integrates = True
    #: whether one Captum call may attribute several layers at once (none of ours may)
    multi_layer = False

    def captum_class(self):
        raise NotImplementedError

    def prepare(self, model: nn.Module, x: torch.Tensor) -> nn.Module:
        return model

    def _attribute_kwargs(self) -> dict:
        o = self.options
        return {"n_steps": o.n_steps, "internal_batch_size": o.internal_batch_size} if self.integrates else {}

    def scores(self, analysis: Analysis, seed: int) -> dict[str, np.ndarray]:
        units, device = analysis.units, analysis.device
        manifold = analysis.task.manifold(seed).to(device)
        work = copy.deepcopy(analysis.model).to(device).eval()
        work = self.prepare(work, manifold.batches[0][0][:1])
        cls = self.captum_class()
        sources = {layer.name: channel_sources(work, layer) if self.options.sources == "producers"
                   else [work.get_submodule(layer.name)] for layer in units.layers}
        modules = [m for layer in units.layers for m in sources[layer.name]]
        per_module = {m: torch.zeros(m.weight.shape[0], dtype=torch.float64) for m in modules}
        # Captum's layer-list mode replaces every listed output at once by its interpolation,
        # which for layers in series is not each layer's IG (and fails: upstream is unused),
        # so each module gets its own call.
        calls = [modules] if self.multi_layer else [[m] for m in modules]
        for group in tqdm(calls, desc=self.name, unit="module", disable=not analysis.progress):
            method = cls(work, group if self.multi_layer else group[0])
            for x, y in manifold:
                try:
                    a = method.attribute(x, target=y, **self._attribute_kwargs())
                except (RuntimeError, TypeError, AssertionError) as exc:
                    raise ModelError(f"{self.name}: Captum failed on {type(work).__name__}: {exc}") from exc
                for m, am in zip(group, a if self.multi_layer else [a]):
                    per_module[m] += reduce_per_channel(am).double().cpu()
        n = max(len(manifold), 1)
        return {layer.name: (sum(per_module[m] for m in sources[layer.name]) / n).numpy() for layer in units.layers}


class IntegratedGradientsCriterion(AttributionCriterion):
    """Integrated Gradients (Sundararajan et al. 2017) at each unit's layer."""

    name = "integrated_gradients"

    def captum_class(self):
        from captum.attr import LayerIntegratedGradients

        return LayerIntegratedGradients


class ConductanceCriterion(AttributionCriterion):
    """Conductance (Dhamdhere et al. 2018): the flow of IG through each unit."""

    name = "conductance"

    def captum_class(self):
        from captum.attr import LayerConductance

        return LayerConductance


class InternalInfluenceCriterion(AttributionCriterion):
    """Internal Influence (Leino et al. 2018): the unit's gradient integrated along the path."""

    name = "internal_influence"

    def captum_class(self):
        from captum.attr import InternalInfluence

        return InternalInfluence


class DeepLiftCriterion(AttributionCriterion):
    """DeepLIFT (Shrikumar et al. 2017), rescale rule, zero reference."""

    name = "deeplift"
    integrates = False

    def captum_class(self):
        from captum.attr import LayerDeepLift

        return LayerDeepLift

    def prepare(self, model: nn.Module, x: torch.Tensor) -> nn.Module:
        return unshare_activations(model, x)
