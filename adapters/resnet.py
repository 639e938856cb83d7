"""ResNets: torchvision's resnet18/34/50/101/152 and the project's CIFAR-style ResNets.

Units are the inner channels of every block and the channels of each stage's residual
stream (coupled across the stage by the additions, so one unit is one stream channel in
every block of the stage). The head `fc` is never pruned. The stage chain (stem, each
block, pooled head) lets an engine re-run only the blocks after an intervention.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import ResNet

from cswap.adapters.generic import GenericAdapter
from cswap.models.cifar_resnet import CifarResNet


class _Head(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.avgpool, self.fc = model.avgpool, model.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNetAdapter(GenericAdapter):
    name = "resnet"
    priority = 10

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, (ResNet, CifarResNet))

    def ignored_layers(self, model: nn.Module) -> list[nn.Module]:
        return [model.fc, *super().ignored_layers(model)]

    def stages(self, model: nn.Module) -> list[nn.Module]:
        stem = [model.conv1, model.bn1, model.relu] + ([model.maxpool] if hasattr(model, "maxpool") else [])
        blocks = [b for name in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, name) for b in getattr(model, name)]
        return [nn.Sequential(*stem), *blocks, _Head(model)]
