"""Tiny models, in-memory tasks and a minimal significance test shared by the tests (CPU, seconds)."""
from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from cswap.interfaces import Decision, SignificanceTest
from cswap.models.cifar_resnet import cifar_resnet8
from cswap.tasks.classification import ClassificationTask

CLASSES = 4

# The thread count is the suite's (tests/conftest.py, CSWAP_TEST_THREADS).


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return cifar_resnet8(width=8, in_channels=1, num_classes=CLASSES).eval()


def tiny_mobilenet() -> nn.Module:
    """torchvision's MobileNetV2 (inverted residuals, depthwise convs, ReLU6 in place), shrunk:
    two short stages (the second has a residual block) and a 16-channel last conv instead of
    1280, so a per-unit analysis takes seconds."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(
        num_classes=CLASSES, width_mult=1.0,
        inverted_residual_setting=[[1, 8, 1, 1], [2, 16, 2, 2]])
    model.features[-1] = Conv2dNormActivation(16, 16, kernel_size=1, activation_layer=nn.ReLU6)
    model.classifier[1] = nn.Linear(16, CLASSES)
    return model.eval()


def blob_data(shape: tuple[int, ...], n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable random data: class k adds a fixed random pattern to noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(CLASSES, *shape, generator=torch.Generator().manual_seed(1234))
    y = torch.arange(n) % CLASSES
    x = 0.7 * patterns[y] + torch.randn(n, *shape, generator=g)
    return x, y


def tensor_task(shape, samples_per_class: int = 3, n: int = 64):
    train, test = blob_data(shape, n, 0), blob_data(shape, n, 1)
    return ClassificationTask.from_tensors(*train, samples_per_class, test=test, batch_size=64)


def train_briefly(model: nn.Module, task, steps: int = 30) -> nn.Module:
    """A few Adam steps so that units matter unequally (random models have flat curves)."""
    x, y = task._tensors["train"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    torch.manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


class AlwaysNeutral(SignificanceTest):
    """A third-party test in its smallest form: every unit neutral, the interface's defaults
    for everything else (`for_scorer` among them), nothing the core knows by name."""

    alpha = 0.05

    def with_alpha(self, alpha):
        return self

    def effect(self, sigma, sigma_star):
        return sigma_star - sigma

    def decide(self, sigma, sigma_star, groups):
        return [Decision("neutral", 0.0, {}, []) for _ in sigma_star]
