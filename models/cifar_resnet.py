"""CIFAR-style ResNets (He et al. 2016, section 4.2) as model builders.

torchvision only ships ImageNet ResNets, whose 7x7 stem and max-pool throw away most of a
28x28 or 32x32 image. The CIFAR family (ResNet-8/14/20/32/56) keeps the resolution with a 3x3
stem and three stages of width w, 2w, 4w. Shortcuts that change shape use a 1x1 convolution
with BatchNorm ("option B"): the zero-padding shortcut ("option A") is a parameter-free
lambda that torch-pruning cannot trace, and it would hide the residual stream's coupling.
"""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: stem, three stages of n blocks, global pool, linear head."""

    def __init__(self, depth: int = 20, width: int = 16, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        planes, stages = width, []
        for i, w in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(planes, w, stride))
                planes = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 with the usual CIFAR stem (3x3 stride-1 conv, no max-pool), the
    variant most CIFAR-10 ResNet-18 checkpoints use (11.2M parameters, as in the paper)."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def cifar_resnet8(**kwargs) -> CifarResNet:
    return CifarResNet(depth=8, **kwargs)


def cifar_resnet14(**kwargs) -> CifarResNet:
    return CifarResNet(depth=14, **kwargs)


def cifar_resnet20(**kwargs) -> CifarResNet:
    return CifarResNet(depth=20, **kwargs)


def cifar_resnet32(**kwargs) -> CifarResNet:
    return CifarResNet(depth=32, **kwargs)


def cifar_resnet56(**kwargs) -> CifarResNet:
    return CifarResNet(depth=56, **kwargs)
