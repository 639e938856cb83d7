"""Intervention (zeroed reads) == physical removal, and the parameter ledger == real counts;
the up-front per-layer check of both (`cswap.verify`) on models built to break them."""
from __future__ import annotations

import contextlib
import copy
import logging
import random
import time

import pytest
import torch
import torchvision
from torch import nn

import cswap
from cswap.build import resolve_adapter
from cswap.discovery import _note_if_slow, discover
from cswap.intervention import Intervention
from cswap.models.cifar_resnet import cifar_resnet20
from cswap.removal import ParamLedger, count_params, prune_units
from cswap.verify import verify_units

from conftest import blobs, randomize_batchnorm


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


# ---- the up-front check: every layer's cut is its removal, and its ledger is exact ----------
class HiddenMix(nn.Module):
    """Layer `a` is read by a channel mean that is no module: discovery's static rules cannot
    see it, so cutting a channel of `a` (zeroing b's column) is not removing it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 12), nn.Linear(12, 10), nn.Linear(10, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = h - h.mean(dim=1, keepdim=True)
        return self.head(torch.relu(self.b(h)))


class FixedSplit(nn.Module):
    """Splits its input with sizes fixed at construction (as timm's MixNet convolutions do)."""

    def __init__(self):
        super().__init__()
        self.sizes, self.left, self.right = [6, 6], nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x):
        a, b = torch.split(x, self.sizes, 1)
        return self.left(a) + self.right(b)


def _generic_graph(model, x):
    _, adapter = resolve_adapter("generic", model)
    return adapter, adapter.units(model, x)


@contextlib.contextmanager
def cswap_messages(level=logging.WARNING):
    """What the `cswap` logger says at `level` and above, whatever handlers the CLI set up."""
    lines: list[str] = []
    handler = logging.Handler(level)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("cswap")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_a_layer_whose_cut_is_not_its_removal_is_left_out_and_a_run_completes():
    torch.manual_seed(0)
    model = HiddenMix().eval()
    adapter, graph = _generic_graph(model, torch.randn(1, 8))
    assert [layer.name for layer in graph.layers] == ["b", "a"]  # the static rules do not catch `a`
    verified = verify_units(model, graph, adapter, torch.randn(1, 8))
    assert [layer.name for layer in verified.layers] == ["b"]
    assert verified.skipped["a"].startswith("cut != removal") and "differ by" in verified.skipped["a"]
    x, y = blobs(20, classes=3, dim=8)
    plan = cswap.analyze(model, (x, y), samples_per_class=10, adapter="generic", progress=False)
    assert plan.layers == {"b": 10} and "cut != removal" in plan.skipped_layers["a"]
    assert plan.steps and all(step.unit.layer == "b" for step in plan.steps)
    pruned = plan.apply(model, recovery="none")  # the plan replays, and its removal is the cut
    cut_model = copy.deepcopy(model)
    cut = Intervention(cut_model, verified)
    for step in plan.steps[:plan.num_noncritical]:
        cut.cut(step.unit)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), cut_model(x), atol=1e-6, rtol=0)


def test_verification_keeps_exact_layers_and_leaves_model_and_random_state_alone():
    for model, x in ((Branchy().eval(), torch.randn(1, 3, 16, 16)),
                     (randomize_batchnorm(cifar_resnet20(in_channels=1)), torch.randn(1, 1, 28, 28))):
        _, adapter = resolve_adapter("auto", model)
        graph = adapter.units(model, x)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        rng = torch.random.get_rng_state()
        verified = verify_units(model, graph, adapter, x)
        assert [layer.name for layer in verified.layers] == [layer.name for layer in graph.layers]
        assert verified.skipped == graph.skipped and not verified.unverified
        assert torch.equal(torch.random.get_rng_state(), rng), "verification must not draw from the global RNG"
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert next(model.parameters()).dtype == torch.float32


def test_a_ledger_that_is_off_is_caught_with_both_counts():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    adapter, graph = _generic_graph(model, torch.randn(1, 4))
    layer = graph.layer("0")
    layer.frees = [f for f in layer.frees if f[0] != "0.bias"]  # as if discovery had missed the bias
    verified = verify_units(model, graph, adapter, torch.randn(1, 4))
    assert [layer.name for layer in verified.layers] == ["2"]
    # channels 0, 3, 5 of Linear(4, 6): 3 x 4 weights + 3 biases + 3 x 5 columns of the next layer
    assert verified.skipped["0"] == ("the parameter ledger is off: removing channels [0, 3, 5] frees 30 "
                                     "parameters, ParamLedger predicted 27")


def test_removal_that_breaks_the_forward_is_left_out_with_the_module_named():
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), FixedSplit(), nn.ReLU(), nn.Linear(4, 3)).eval()
    adapter, graph = _generic_graph(model, torch.randn(1, 8))
    with cswap_messages() as warnings:
        verified = verify_units(model, graph, adapter, torch.randn(1, 8))
    assert [layer.name for layer in verified.layers] == ["2.left"]
    reason = verified.skipped["0"]
    assert "breaks the model's forward in module '2'" in reason and "split_with_sizes" in reason
    assert "\n" not in reason and any(w.startswith("layer 0 left out") for w in warnings)


def test_a_layer_whose_cut_changes_nothing_is_kept_but_listed_unverified():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every channel of layer 0 is dead after the ReLU
    adapter, graph = _generic_graph(model, torch.randn(1, 4))
    verified = verify_units(model, graph, adapter, torch.randn(1, 4))
    assert [layer.name for layer in verified.layers] == ["2", "0"]
    assert "changes nothing" in verified.unverified["0"] and "2" not in verified.unverified


def test_vit_heads_whose_removal_leaves_attributes_stale_are_left_out():
    """The adapter path (`remove`, a fresh copy per layer): an adapter that forgets to update
    num_heads breaks the attention's reshape; only the head layers are left out."""
    import timm

    from cswap.adapters.vit import VitAdapter

    class StaleHeads(VitAdapter):
        def after_pruning(self, model):
            pass

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    adapter = StaleHeads()
    verified = verify_units(model, adapter.units(model, x), adapter, x)
    assert sorted(layer.name for layer in verified.layers) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert "breaks the model's forward in module 'blocks.0.attn'" in verified.skipped["blocks.0.attn"]
    good = verify_units(model, VitAdapter().units(model, x), VitAdapter(), x)
    assert len(good.layers) == 4 and not good.unverified


def test_a_slow_trace_says_what_it_is_doing():
    with cswap_messages() as lines:
        with _note_if_slow("torch-pruning is tracing Net", after=0.01):
            time.sleep(0.2)
        with _note_if_slow("torch-pruning is tracing Fast", after=5.0):
            pass
    assert len(lines) == 1 and "tracing Net: still running after" in lines[0] and "can take minutes" in lines[0]
