"""ResNets: torchvision's resnet18/34/50/101/152, timm's ResNet family and the project's
CIFAR-style ResNets.

Units are the inner channels of every block and the channels of each stage's residual
stream (coupled across the stage by the additions, so one unit is one stream channel in
every block of the stage). The head `fc` is never pruned. The stage chain (stem, each
block, pooled head) lets an engine re-run only the blocks after an intervention.

timm's `ResNet` class covers its ResNets and their variants built from the same skeleton
(deep and tiered stems: resnet26d, resnet10t; ResNeXt, SE and ECA blocks; SK-ResNet,
ResNeSt, Res2Net): stem `conv1, bn1, act1, maxpool`, `layer1..4`, head `global_pool, fc`.
Their units are torch-pruning's groups as for any model, each layer checked (cut == removal)
before a run; what this adapter adds is the stage chain, so the staged engine applies. The
chain is the model's eval forward (timm's head dropout, `drop_rate`, is off in eval).
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import ResNet

from cswap.adapters.generic import GenericAdapter
from cswap.models.cifar_resnet import CifarResNet


def _timm_resnet() -> tuple[type, ...]:
    try:
        from timm.models.resnet import ResNet as TimmResNet
    except ImportError:  # timm is a dependency, but an adapter must not fail to load without it
        return ()
    return (TimmResNet,)


class _Head(nn.Module):
    """Global pooling, flattening (timm's pooling flattens already: a no-op then), `fc`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.pool = model.avgpool if hasattr(model, "avgpool") else model.global_pool
        self.fc = model.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class ResNetAdapter(GenericAdapter):
    name = "resnet"
    priority = 10

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, (ResNet, CifarResNet, *_timm_resnet()))

    def ignored_layers(self, model: nn.Module) -> list[nn.Module]:
        return [model.fc, *super().ignored_layers(model)]

    def stages(self, model: nn.Module) -> list[nn.Module]:
        activation = model.act1 if hasattr(model, "act1") else model.relu  # timm names it act1
        stem = [model.conv1, model.bn1, activation] + ([model.maxpool] if hasattr(model, "maxpool") else [])
        blocks = [b for name in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, name)
                  for b in getattr(model, name)]
        return [nn.Sequential(*stem), *blocks, _Head(model)]
