"""LRP relevance per unit, with zennit on an FX-rewritten copy of the model.

What was tried (captum 0.9, zennit 0.5.1, on the project's CIFAR ResNet and torchvision's
MobileNetV2):
 - Captum `LayerLRP` runs on the ResNet, but Captum assigns rules to modules only: the
   residual `out + identity` is a plain tensor operation, so relevance goes back through it as
   a gradient (both branches get the full relevance; conservation breaks and magnitudes blow
   up: the stem's total relevance was ~10^4 times the output). It also shares state across
   the twice-called `relu`. On MobileNetV2 it raises: `ReLU6` has no rule.
 - zennit also works through hooks, but is built to be combined with *canonizers* that
   rewrite the model: BatchNorm is merged into the preceding convolution, and a residual sum
   becomes a `zennit.layer.Sum` module to which the composite gives the proportional `Norm`
   rule. zennit ships such a canonizer only for torchvision's ResNet blocks; here the model is
   traced with torch.fx instead and every tensor-tensor addition is replaced by a `Sum`, which
   covers any FX-traceable residual network (our ResNets, MobileNetV2's inverted residuals,
   torchvision ResNets), and Conv->BatchNorm pairs are read off the traced graph. Activations
   (ReLU, ReLU6) get zennit's `Pass` rule, so in-place and reused activations are no issue.

So this criterion uses zennit (`EpsilonPlusFlat` by default: epsilon rule on dense layers,
z+ on convolutions, flat on the first layer). A unit's relevance is the relevance arriving
at the output of the module(s) producing its channel (the gradient zennit's modified backward
leaves there), |.| summed over space and averaged over S, target = true class (the initial
relevance is the target logit). Models torch.fx cannot trace (data-dependent control flow)
are refused with the reason; zennit is an optional dependency (`pip install zennit`).
"""
from __future__ import annotations

import copy
import operator
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cswap.errors import ModelError
from cswap.interfaces import Analysis
from cswap.ranking import RankingOptions

from .base import RankingCriterion, channel_sources, reduce_per_channel


def _zennit():
    try:
        import zennit  # noqa: F401
    except ImportError as exc:
        raise ModelError("criterion 'lrp' needs zennit: pip install zennit") from exc
    import zennit.canonizers
    import zennit.composites
    import zennit.layer

    return zennit


class _Stack2(nn.Module):
    """Stacks the two summands on a new last axis, for zennit's Sum (what its own ResNet canonizer does)."""

    def forward(self, a, b):
        return torch.stack([a, b], dim=-1)


def residual_sums_as_modules(model: nn.Module) -> torch.fx.GraphModule:
    """FX-trace `model` and replace each addition of two tensors by Stack2 -> zennit Sum.

    Submodules keep their qualified names, so units found on `model` address the result.
    """
    zennit = _zennit()
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, ...
        raise ModelError(f"criterion 'lrp' needs an FX-traceable model; tracing {type(model).__name__} failed: {exc}") from exc
    count = 0
    for node in list(gm.graph.nodes):
        is_add = (node.op == "call_function" and node.target in (operator.add, torch.add)) or \
                 (node.op == "call_method" and node.target == "add")
        if not is_add or len(node.args) != 2 or not all(isinstance(a, torch.fx.Node) for a in node.args):
            continue
        stack, total = f"_lrp_stack{count}", f"_lrp_sum{count}"
        gm.add_submodule(stack, _Stack2())
        gm.add_submodule(total, zennit.layer.Sum())
        with gm.graph.inserting_before(node):
            stacked = gm.graph.call_module(stack, tuple(node.args))
            summed = gm.graph.call_module(total, (stacked,))
        node.replace_all_uses_with(summed)
        gm.graph.erase_node(node)
        count += 1
    gm.graph.lint()
    gm.recompile()
    return gm


def conv_bn_pairs(gm: torch.fx.GraphModule) -> list[tuple[nn.Module, nn.Module]]:
    """(conv or linear, batch norm) where the norm reads only that module's output, which nothing else reads."""
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0] if node.args else None
        if isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1:
            producer = gm.get_submodule(src.target)
            if isinstance(producer, (nn.Conv2d, nn.Conv1d, nn.Conv3d, nn.Linear)):
                pairs.append((producer, gm.get_submodule(node.target)))
    return pairs


def _graph_merge_batchnorm(pairs):
    """A zennit canonizer merging exactly the given Conv->BN pairs (temporarily, undone on exit)."""
    from zennit.canonizers import MergeBatchNorm

    class GraphMergeBatchNorm(MergeBatchNorm):
        def apply(self, root_module):
            instances = []
            for linear, bn in pairs:
                inst = self.copy()
                inst.register([linear], bn)
                instances.append(inst)
            return instances

    return GraphMergeBatchNorm()


class LRPCriterion(RankingCriterion):
    """Layer-wise relevance propagation with zennit (see the module docstring for why zennit)."""

    name = "lrp"

    class Options(RankingOptions):
        composite: Literal["epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1_flat"] = "epsilon_plus_flat"
        sources: Literal["producers", "root"] = "producers"

    def scores(self, analysis: Analysis, seed: int) -> dict[str, np.ndarray]:
        zennit = _zennit()
        units = analysis.units
        manifold = analysis.task.manifold(seed).to(analysis.device)
        gm = residual_sums_as_modules(copy.deepcopy(analysis.model).to(analysis.device).eval())
        sources = {layer.name: channel_sources(gm, layer) if self.options.sources == "producers"
                   else [gm.get_submodule(layer.name)] for layer in units.layers}
        modules = {m for ms in sources.values() for m in ms}
        relevance = {m: torch.zeros(m.weight.shape[0], dtype=torch.float64) for m in modules}

        def capture(module, args, output):
            def add(grad, m=module) -> None:  # a tensor hook must return None to leave the gradient
                relevance[m] += reduce_per_channel(grad).double().cpu()
            output.register_hook(add)

        composite_cls = {
            "epsilon_plus_flat": zennit.composites.EpsilonPlusFlat,
            "epsilon_gamma_box": None,  # needs input bounds; refused below
            "epsilon_alpha2_beta1_flat": zennit.composites.EpsilonAlpha2Beta1Flat,
        }[self.options.composite]
        if composite_cls is None:
            raise ModelError("composite epsilon_gamma_box needs the input bounds; use epsilon_plus_flat")
        composite = composite_cls(canonizers=[_graph_merge_batchnorm(conv_bn_pairs(gm))])
        hooks = [m.register_forward_hook(capture) for m in modules]
        try:
            with composite.context(gm) as modified:
                for x, y in tqdm(manifold, desc=self.name, unit="batch", disable=not analysis.progress):
                    x = x.detach().clone().requires_grad_(True)
                    out = modified(x)
                    if out.dim() != 2:
                        raise ModelError(f"lrp expects class logits (N, C), the model returned {tuple(out.shape)}")
                    start = torch.zeros_like(out).scatter_(1, y.view(-1, 1).long(), 1.0) * out.detach()
                    torch.autograd.backward(out, start)
        finally:
            for h in hooks:
                h.remove()
        n = max(len(manifold), 1)
        out_scores = {}
        for layer in units.layers:
            total = sum(relevance[m] for m in sources[layer.name]) / n
            if not torch.isfinite(total).all():
                raise ModelError(f"lrp: non-finite relevance at {layer.name!r}")
            out_scores[layer.name] = total.numpy()
        return out_scores
