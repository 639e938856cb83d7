"""Adapters: cut == removal on the paper's architectures, ViT heads and MLP neurons,
stage chains, and the errors a user sees for what an adapter cannot handle."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

from cswap.adapters.generic import GenericAdapter
from cswap.adapters.vit import VitAdapter
from cswap.build import resolve_adapter
from cswap.errors import ConfigError, ModelError
from cswap.interfaces import RANKED, PlanStep, Unit
from cswap.intervention import Intervention
from cswap.models.cifar_resnet import cifar_resnet8
from cswap.options import Target
from cswap.plan import PruningPlan
from cswap.removal import count_params
from cswap.replay import removed_model

from removal_check import check_cut_equals_removal, prepare, stages_forward
from roundoff import output_tolerance


def torchvision_model(name: str, size: int = 32, **kwargs) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    prepare(model, torch.randn(4, 3, size, size))
    return model, torch.randn(2, 3, size, size)


def timm_vit(name: str = "vit_tiny_patch16_224", **kwargs) -> tuple[nn.Module, torch.Tensor]:
    """A timm ViT at 32x32 (4 patches + class token): same blocks, seconds to trace."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, num_classes=10, **kwargs).eval()
    return model, torch.randn(2, 3, 32, 32)


def timm_cnn(name: str, size: int = 32) -> tuple[nn.Module, torch.Tensor]:
    """A timm CNN at random initialisation with BatchNorm statistics made non-trivial."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    prepare(model, torch.randn(4, 3, size, size))
    return model, torch.randn(2, 3, size, size)


PAPER_MODELS = [
    ("resnet18", "resnet", lambda: torchvision_model("resnet18")),
    ("timm_resnet18", "resnet", lambda: timm_cnn("resnet18")),
    ("resnet50", "resnet", lambda: torchvision_model("resnet50")),
    ("mobilenet_v2", "mobilenetv2", lambda: torchvision_model("mobilenet_v2")),
    ("vit_tiny_patch16_224", "vit", lambda: timm_vit("vit_tiny_patch16_224")),
    ("deit_tiny_patch16_224", "vit", lambda: timm_vit("deit_tiny_patch16_224")),
]


@pytest.mark.parametrize("name,adapter,make", PAPER_MODELS, ids=[m[0] for m in PAPER_MODELS])
def test_cut_equals_removal(name, adapter, make):
    model, x = make()
    result = check_cut_equals_removal(model, x, adapter="auto")
    assert result["adapter"] == adapter
    assert result["diff32"] <= 1e-5 or result["diff32"] <= 4 * result["noise32"]


# ---- ViT ------------------------------------------------------------------------------
def vit_plan(model, x, per_block_heads=(0, 2), neurons=range(0, 700, 7)):
    adapter = VitAdapter()
    graph = adapter.units(model, x)
    units = []
    for layer in graph.layers:
        picks = per_block_heads if layer.name.endswith("attn") else neurons
        units += [Unit(layer.name, c) for c in picks if c < layer.channels]
    plan = PruningPlan.build(model, graph, [PlanStep(u, RANKED) for u in units], method="test", adapter="vit")
    return adapter, graph, plan


@torch.no_grad()
def test_vit_pruned_by_heads_and_neurons_runs_and_matches_the_ledger():
    model, x = timm_vit()
    adapter, graph, plan = vit_plan(model, x)
    assert {layer.channels for layer in graph.layers} == {3, 768}  # 3 heads, 768 neurons per block
    heads = sum(1 for s in plan.steps if s.unit.layer.endswith("attn"))
    neurons = len(plan.steps) - heads
    assert heads == 2 * 12 and neurons == 100 * 12
    saved = PruningPlan.from_json(plan.to_json())  # replay as a later process would
    pruned = removed_model(saved, model, len(saved.steps), Target(), adapter)
    assert count_params(pruned) == plan.params_total - plan.cumulative_params_removed()[-1]
    for block in pruned.blocks:
        attn = block.attn
        assert (attn.num_heads, attn.head_dim, attn.attn_dim) == (1, 64, 64)
        assert attn.qkv.out_features == 3 * 64 and attn.proj.in_features == 64
        assert attn.scale == pytest.approx(64 ** -0.5)
        assert block.mlp.fc1.out_features == block.mlp.fc2.in_features == 768 - 100
    out = pruned(x)
    for block in pruned.blocks:  # timm's manual attention path must agree with the fused one
        block.attn.fused_attn = False
    tolerance = output_tolerance(pruned, x)
    torch.testing.assert_close(pruned(x), out, atol=tolerance, rtol=0)
    cut_model = copy.deepcopy(model)
    cut = Intervention(cut_model, graph)
    for step in plan.steps:
        cut.cut(step.unit)
    torch.testing.assert_close(out, cut_model(x), atol=max(tolerance, output_tolerance(cut_model, x)), rtol=0)
    assert (cut_model(x) - model(x)).abs().max() > 1e-2


def test_vit_head_slices():
    """A head's units: q, k and v rows of qkv, one head_dim slice of proj's input."""
    model, x = timm_vit()
    graph = VitAdapter().units(model, x)
    layer = graph.layer("blocks.0.attn")
    assert layer.modules == ["blocks.0.attn.qkv", "blocks.0.attn.proj"]
    (pname, dim, per_head), = layer.reads
    assert (pname, dim, per_head[1]) == ("blocks.0.attn.proj.weight", 1, list(range(64, 128)))
    frees = {(p, d): counts for p, d, counts in layer.frees}
    assert frees[("blocks.0.attn.qkv.weight", 0)] == [192] * 3
    assert frees[("blocks.0.attn.proj.weight", 1)] == [64] * 3
    assert [layer.name for layer in graph.layers[:3]] == ["blocks.11.mlp.fc1", "blocks.11.attn", "blocks.10.mlp.fc1"]


def test_vit_options_and_left_out_sites():
    model, x = timm_vit()
    graph = VitAdapter(VitAdapter.Options(heads=False, ignored_layers=["blocks.0.mlp.fc1"])).units(model, x)
    assert all(layer.name.endswith("fc1") for layer in graph.layers) and len(graph.layers) == 11
    assert "head pruning is off" in graph.skipped["blocks.3.attn"]
    assert graph.skipped["blocks.0.mlp.fc1"] == "listed in ignored_layers"
    with pytest.raises(ConfigError, match="blocks.0.mlp.fc2"):
        VitAdapter(VitAdapter.Options(ignored_layers=["blocks.0.mlp.fc2"])).units(model, x)
    normed, x = timm_vit(scale_attn_norm=True)
    graph = VitAdapter().units(normed, x)
    assert "scale_norm" in graph.skipped["blocks.0.attn"]


def small_torchvision_vit() -> tuple[nn.Module, torch.Tensor]:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64)
    prepare(model, torch.randn(4, 3, 32, 32))  # also: its head starts at zero
    return model, torch.randn(2, 3, 32, 32)


def test_torchvision_vit_prunes_mlp_and_explains_heads():
    model, x = small_torchvision_vit()
    name, adapter = resolve_adapter("auto", model)
    graph = adapter.units(model, x)
    assert name == "vit" and [layer.channels for layer in graph.layers] == [64, 64]
    check_cut_equals_removal(model, x, adapter="vit")
    assert "MultiheadAttention" in graph.skipped["encoder.layers.encoder_layer_0.self_attention"]


def test_vit_analysis_end_to_end():
    """C-SWAP on a two-block ViT: the plan replays, the run's self-check holds, and the
    staged engine (the adapter's stage chain) gives the same plan as full forward passes."""
    from cswap.api import analyze
    from cswap.replay import ReplayData, adapter_of, replay_steps, steps_for
    from cswap.run import self_check

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, in_chans=1,
                              embed_dim=16, depth=2, num_heads=2, mlp_ratio=2, num_classes=3).eval()
    x, y = torch.randn(24, 1, 8, 8), torch.arange(3).repeat(8)
    plan = analyze(model, (x, y), samples_per_class=8, progress=False)
    assert plan.adapter == "vit" and len(plan.layers) == 4
    target = Target(params_ratio=0.2, recovery="none")
    pruned = plan.apply(model, target)
    assert count_params(pruned) <= 0.8 * count_params(model) + max(s.params_freed for s in plan.steps)
    graph = VitAdapter().units(model, x[:1])
    k, _ = steps_for(plan, model, target, adapter_of(plan))
    cut = replay_steps(plan, model, k, target, ReplayData(), adapter=VitAdapter(), graph=graph,
                       keep_cut=True).cut  # heads cut, not removed
    assert self_check(cut, pruned, x) < 1e-5
    full = analyze(model, (x, y), samples_per_class=8, progress=False, engine="full")
    assert [s.to_json() for s in full.steps] == [s.to_json() for s in plan.steps]  # stages change nothing


# ---- stage chains ---------------------------------------------------------------------
def _tv(name, size=32, **kw):
    return lambda: torchvision_model(name, size, **kw)


STAGED = [
    ("resnet18", _tv("resnet18")),
    ("cifar_resnet8", lambda: (cifar_resnet8(width=8).eval(), torch.randn(2, 3, 16, 16))),
    ("timm_resnet18", lambda: timm_cnn("resnet18")),
    ("timm_resnet26d", lambda: timm_cnn("resnet26d", 64)),  # deep stem (a Sequential conv1)
    ("mobilenet_v2", _tv("mobilenet_v2")),
    ("vit_tiny", lambda: timm_vit()),
    ("deit_tiny_distilled", lambda: timm_vit("deit_tiny_distilled_patch16_224")),
    ("torchvision_vit", small_torchvision_vit),
    ("sequential", lambda: (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)), torch.randn(2, 3, 8, 8))),
]


@pytest.mark.parametrize("name,make", STAGED, ids=[s[0] for s in STAGED])
@torch.no_grad()
def test_stages_in_order_equal_forward(name, make):
    model, x = make()
    model(x)  # materialise lazy layers
    _, adapter = resolve_adapter("auto", model)
    stages = adapter.stages(model)
    assert stages is not None and len(stages) >= 2
    torch.testing.assert_close(stages_forward(stages, x), model(x), atol=0, rtol=0)


@torch.no_grad()
def test_stages_follow_the_pruned_model():
    model, x = timm_vit()
    adapter, _, plan = vit_plan(model, x)
    pruned = removed_model(plan, model, len(plan.steps), Target(), adapter)
    torch.testing.assert_close(stages_forward(adapter.stages(pruned), x), pruned(x), atol=0, rtol=0)


# ---- errors ---------------------------------------------------------------------------
def test_generic_unknown_ignored_layer_is_named():
    model, x = torchvision_model("resnet18")
    with pytest.raises(ConfigError, match="layer9"):
        GenericAdapter(GenericAdapter.Options(ignored_layers=["layer9"])).units(model, x)


def test_generic_names_the_module_that_breaks_tracing():
    class Detaching(nn.Module):
        def forward(self, x):
            return x.detach()

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Detaching(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ModelError, match=r"'1'.*Hint.*ignored_layers"):
        GenericAdapter().units(model, torch.randn(1, 3, 8, 8))


def test_vit_adapter_refuses_a_model_without_transformer_blocks():
    model, x = torchvision_model("resnet18")
    with pytest.raises(ModelError, match="no timm Attention"):
        VitAdapter().units(model, x)
