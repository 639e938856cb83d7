"""Shared check for adapter tests: cutting units == physically removing them.

Used by test_adapters.py and test_torchvision_matrix.py. `prepare` gives a random model
O(1) activations and no dead branches, so the comparison means something.
"""
from __future__ import annotations

import torch
from torch import nn

from cswap.build import resolve_adapter
from cswap.interfaces import RANKED, PlanStep, Unit
from cswap.intervention import Intervention
from cswap.plan import PruningPlan
from cswap.options import Target
from cswap.replay import removed_model
from cswap.removal import count_params
from cswap.verify import verify_units


@torch.no_grad()
def prepare(model: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """Make a randomly initialised model a meaningful test subject; returns it in eval mode.

    Random BN affine, then running statistics taken from one train-mode pass over `x` (a
    separate random batch: statistics fitted exactly to the test batch make near-constant
    channels amplify any cut enormously), so activations are O(1) in most models;
    layer-scale parameters (1e-6 in ConvNeXt) and zero-initialised weights (the heads of
    torchvision's ViT) get O(1) values, so that every unit can change the output."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]  # model order: seeded
    for m in norms:
        if m.affine:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics exactly
    for name, p in model.named_parameters():
        near_zero_scale = p.dim() == 1 and p.numel() > 1 and bool((p.abs() <= 1e-4).all()) and not name.endswith("bias")
        if name.endswith("layer_scale") or near_zero_scale:  # ConvNeXt, timm `gamma`/`ls*`: 1e-6 at init
            p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
        elif name.endswith("weight") and p.dim() >= 2 and not p.any():  # zero-initialised heads
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    if norms:
        model.train()
        model(x)
    return model.eval()


def pick_units(graph, per_layer: int = 2, max_layers: int | None = None, seed: int = 0) -> list[Unit]:
    """`per_layer` random channels from layers spread over the depth (first and last included)."""
    g = torch.Generator().manual_seed(seed)
    layers = graph.layers
    if max_layers is not None and len(layers) > max_layers:
        idx = torch.linspace(0, len(layers) - 1, max_layers).round().long().unique().tolist()
        layers = [layers[i] for i in idx]
    units = []
    for layer in layers:
        k = min(per_layer, layer.channels - 1)
        units += [Unit(layer.name, int(c)) for c in torch.randperm(layer.channels, generator=g)[:k]]
    return units


@torch.no_grad()
def check_cut_equals_removal(model: nn.Module, x: torch.Tensor, adapter="auto", *, per_layer: int = 2,
                             max_layers: int | None = None, atol: float = 1e-5, verify: bool = False) -> dict:
    """Remove units through the plan (as a run does) and compare with cutting them.

    Two comparisons: in float64 the two models must agree to rounding (1e-9 relative: the
    structure is exactly equivalent); in float32 to `atol`, or to float32's own rounding
    level where that is larger. A deep random network amplifies rounding (random ResNet-50
    with calibrated BatchNorm: float32 vs float64 of the *same* model differ by ~8e-5), so
    an absolute 1e-5 there would test float32, not the pruning.

    Also checks that the cut changes the output (so the comparison is not vacuous), that
    the pruned model's parameter count is what ParamLedger predicted, and that it runs on
    another batch size. Cuts `model` in place and converts it to float64; returns numbers.

    `verify=True` checks the graph a run analyses: the adapter's units after
    `cswap.verify.verify_units` has left out the layers whose cut is not their removal (with
    a reason each); the units tested here are drawn independently of the verification's.
    """
    model.eval()
    name, adapter = resolve_adapter(adapter, model)
    graph = adapter.units(model, x)
    discovered = len(graph.layers)
    if verify:
        graph = verify_units(model, graph, adapter, x)
    assert graph.layers, f"no prunable layers: {graph.skipped}"
    units = pick_units(graph, per_layer, max_layers)
    plan = PruningPlan.build(model, graph, [PlanStep(u, RANKED) for u in units], method="test", adapter=name)
    original = model(x)
    pruned = removed_model(plan, model, len(plan.steps), Target(), adapter)
    removed = pruned(x)
    predicted = plan.params_total - plan.cumulative_params_removed()[-1]
    assert count_params(pruned) == predicted, (count_params(pruned), predicted)
    assert pruned(torch.cat([x, x])[: x.shape[0] + 1]).shape[1:] == removed.shape[1:]
    removed64 = pruned.double()(x.double())
    del pruned  # large zoo models: keep at most two copies alive
    cut = Intervention(model, graph)
    for u in units:
        cut.cut(u)
    intervened = model(x)
    scale = original.abs().max().item()
    effect = (intervened - original).abs().max().item()
    assert effect > 1e-4 * max(scale, 1e-3), f"cutting {len(units)} units changed nothing"
    del cut
    intervened64 = model.double()(x.double())
    diff64 = (removed64 - intervened64).abs().max().item()
    assert diff64 <= 1e-9 * max(scale, 1.0), f"float64: removal differs from the cut by {diff64:.3g}"
    noise32 = (intervened.double() - intervened64).abs().max().item()
    tol = max(atol, 4 * noise32)
    torch.testing.assert_close(removed, intervened, atol=tol, rtol=0)
    return {"adapter": name, "layers": len(graph.layers), "skipped": len(graph.skipped), "units": len(units),
            "discovered": discovered, "left_out": discovered - len(graph.layers),
            "scale": scale, "effect": effect, "diff32": (removed - intervened).abs().max().item(),
            "noise32": noise32, "diff64": diff64}


def stages_forward(stages, x: torch.Tensor) -> torch.Tensor:
    for stage in stages:
        x = stage(x)
    return x
