"""A small MobileNetV2 for 28x28 single-channel images (Fashion-MNIST), as a model builder.

The model *is* a torchvision `MobileNetV2` (so the `mobilenetv2` adapter matches it and its
stage chain applies), rebuilt for small inputs:
 - stem: a 3x3 convolution with stride 1, `in_channels` inputs and 16 outputs (torchvision's
   has stride 2, 3 inputs and 32 outputs), so the 28x28 image is not halved before the first
   block, and the first block (expansion 1) is rebuilt on 16 channels: the 28x28 part of the
   network dominates its cost on a CPU;
 - a reduced `inverted_residual_setting`: four stages of 1, 2, 2, 1 blocks, expansion 2
   instead of 6, total stride 4 (28 -> 14 -> 7), ending at 48 channels instead of 320;
 - the last 1x1 convolution widens to `last_channel` (128) instead of torchvision's 1280,
   which would otherwise hold most of the network's parameters.
About 27k parameters at width_mult 1 (see benchmarks/train_fashion_mnist.py --arch
fmnist_mobilenetv2 and docs/results/fashion_mnist.md for its accuracy).
"""
from __future__ import annotations

from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual, MobileNetV2, _make_divisible
from torchvision.ops.misc import Conv2dNormActivation

# t (expansion), c (output channels), n (blocks), s (stride of the first block)
SMALL_SETTING = [
    [1, 16, 1, 1],  # 28x28
    [2, 24, 2, 2],  # 14x14
    [2, 32, 2, 2],  # 7x7
    [2, 48, 1, 1],  # 7x7
]


def fmnist_mobilenetv2(num_classes: int = 10, in_channels: int = 1, width_mult: float = 1.0,
                       last_channel: int = 128, dropout: float = 0.0, width: int | None = None,
                       round_nearest: int = 8) -> MobileNetV2:
    """MobileNetV2 for 1x28x28 inputs. `width` (stem channels, 16 at width_mult 1) is the
    training script's common width argument and sets `width_mult = width / 16` when given."""
    if width is not None:
        width_mult = width / 16
    model = MobileNetV2(num_classes=num_classes, width_mult=width_mult, inverted_residual_setting=SMALL_SETTING,
                        round_nearest=round_nearest, dropout=dropout)
    stem = _make_divisible(16 * width_mult, round_nearest)
    first = model.features[1]
    model.features[0] = Conv2dNormActivation(in_channels, stem, stride=1, activation_layer=nn.ReLU6)
    model.features[0][0] = nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False)  # as torchvision's, no bias
    model.features[1] = InvertedResidual(stem, first.out_channels, 1, expand_ratio=SMALL_SETTING[0][0])
    last_in = model.features[-1][0].in_channels
    last = _make_divisible(last_channel * max(1.0, width_mult), round_nearest)
    model.features[-1] = Conv2dNormActivation(last_in, last, kernel_size=1, activation_layer=nn.ReLU6)
    model.classifier[-1] = nn.Linear(last, num_classes)
    model.last_channel = last
    for m in model.modules():  # torchvision's initialisation, for the replaced modules too
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model
