"""MobileNetV2 (torchvision `mobilenet_v2`): inverted residuals with depthwise convolutions.

torch-pruning's groups already express what matters here: a depthwise convolution has one
filter per channel, so it joins the group of the expansion convolution that feeds it (one
unit = one expanded channel through expand, depthwise and project), and the linear
bottlenecks of a stage's residual blocks are coupled by their additions (one unit = one
channel of that stream in every block of the stage). Zeroing the consumers' input columns
equals removal for all of them (measured to ~1e-6; docs/architectures.md). The classifier is never
pruned; the 1280-channel last convolution is, since only the classifier reads it.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.mobilenetv2 import MobileNetV2

from cswap.adapters.generic import GenericAdapter


class _Head(nn.Module):
    """torchvision's MobileNetV2.forward after `features`: pool, flatten, classifier."""

    def __init__(self, model: MobileNetV2):
        super().__init__()
        self.classifier = model.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, (1, 1)), 1))


class MobileNetV2Adapter(GenericAdapter):
    name = "mobilenetv2"
    priority = 10

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, MobileNetV2)

    def ignored_layers(self, model: nn.Module) -> list[nn.Module]:
        heads = [m for m in model.classifier.modules() if isinstance(m, nn.Linear)]
        return [*heads, *super().ignored_layers(model)]

    def stages(self, model: nn.Module) -> list[nn.Module]:
        """The stem, each inverted residual block, the last 1x1 convolution, the head."""
        return [*model.features, _Head(model)]
