"""Intervention (zeroed reads) == physical removal, and the parameter ledger == real counts."""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torchvision
from conftest import randomize_batchnorm
from torch import nn

from adapters.cifar_resnet import cifar_resnet20
from cswap.build import resolve_adapter
from cswap.units import Intervention, ParamLedger, count_params, discover, prune_units


class Branchy(nn.Module):
    """A model no adapter knows: concatenation, a depthwise conv, flatten into a linear head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 5, 1), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(11, 11, 3, padding=1, groups=11), nn.BatchNorm2d(11), nn.ReLU())
        self.pw = nn.Conv2d(11, 7, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(7 * 4, 9)
        self.head = nn.Linear(9, 4)

    def forward(self, x):
        x = self.dw(torch.cat([self.a(x), self.b(x)], 1))
        x = torch.flatten(self.pool(torch.relu(self.pw(x))), 1)
        return self.head(torch.relu(self.fc1(x)))


MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 64, 64), "resnet"),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), (3, 64, 64), "resnet"),
    "cifar_resnet20": (lambda: cifar_resnet20(in_channels=1), (1, 28, 28), "resnet"),
    "generic_branchy": (Branchy, (3, 16, 16), "generic"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_cut_equals_removal(name):
    build, shape, expected_adapter = MODELS[name]
    torch.manual_seed(0)
    model = randomize_batchnorm(build())
    x = torch.randn(3, *shape)
    adapter_name, adapter = resolve_adapter("auto", model)
    assert adapter_name == expected_adapter
    graph = adapter.units(model, x[:1])
    assert graph.layers and "fc" not in [l.name for l in graph.layers] and "head" not in [l.name for l in graph.layers]
    rng = random.Random(0)
    for trial in range(2):
        # a random third of every layer, residual-stream layers included
        units = [u for layer in graph.layers for u in rng.sample(layer.units(), max(1, layer.channels // 3))]
        cut_model = copy.deepcopy(model)
        cut = Intervention(cut_model, graph)
        for u in units:
            cut.cut(u)
        pruned = copy.deepcopy(model)
        ledger = ParamLedger(pruned, graph)
        for u in units:
            ledger.remove(u)
        prune_units(pruned, x[:1], units)
        with torch.no_grad():
            y_orig, y_cut, y_pruned = model(x), cut_model(x), pruned(x)
        assert (y_cut - y_orig).abs().max() > 1e-3, "the cut changed nothing: the test would be vacuous"
        torch.testing.assert_close(y_pruned, y_cut, atol=1e-5, rtol=0)
        assert count_params(pruned) == ledger.total - ledger.removed
        for u in units:
            cut.restore(u)
        with torch.no_grad():
            assert torch.equal(cut_model(x), y_orig)


def test_residual_stream_is_one_layer():
    model = cifar_resnet20(in_channels=1).eval()
    graph = discover(model, torch.randn(1, 1, 28, 28), ignored_layers=[model.fc])
    stream = [l for l in graph.layers if "layer3.0.conv2" in l.modules and "layer3.2.conv2" in l.modules]
    assert len(stream) == 1 and stream[0].channels == 64
    # output to input: the last stage's stream is visited before the first stage's
    names = [l.name for l in graph.layers]
    assert names.index(stream[0].name) < names.index("layer1.0.conv1")


def test_layernorm_group_is_not_pruned_silently():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
    graph = discover(model, torch.randn(1, 4))
    assert "0" in graph.skipped and "LayerNorm" in graph.skipped["0"]
    assert [l.name for l in graph.layers] == ["2"]
