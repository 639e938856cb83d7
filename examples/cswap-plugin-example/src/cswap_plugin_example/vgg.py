"""A model family and its adapter: a tiny VGG-style CNN.

The adapter protects the classifier, and gives the engine a stage chain (one stage per conv
block) so C-SWAP re-runs only the blocks after a cut.
"""
from __future__ import annotations

import torch
from torch import nn

from cswap.interfaces import ArchitectureAdapter


class TinyVGG(nn.Module):
    def __init__(self, widths=(8, 16, 32), in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        blocks, c = [], in_channels
        for w in widths:
            blocks.append(nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def tiny_vgg(**kwargs) -> TinyVGG:
    return TinyVGG(**kwargs)


class TinyVGGAdapter(ArchitectureAdapter):
    name = "tiny_vgg"
    priority = 20  # preferred by `adapter: auto` over the generic one

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, TinyVGG)

    def ignored_layers(self, model: nn.Module) -> list[nn.Module]:
        return [model.head[-1]]

    def stages(self, model: nn.Module) -> list[nn.Module]:
        return [*model.blocks, model.head]
