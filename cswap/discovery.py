"""Finding a model's pruning units on torch-pruning's DependencyGraph.

A *layer* here is one torch-pruning dependency group: channels coupled across modules (a
residual stream couples every convolution that writes into it). A *unit* is one channel of
such a group. Cutting a unit's outgoing connections (Algorithm 1, line 4) means zeroing the
weights through which every consumer reads it, i.e. the group's input-channel slices of
convolutions and linear layers (`cswap.intervention`). That is exactly physical removal
(`cswap.removal`) as long as nothing else reads the channel; groups where something else does
(a LayerNorm or GroupNorm mixes the channel into its statistics, the channel is a model
output, a grouped convolution would be left invalid) are reported as not prunable with the
reason, never approximated; `cswap.verify` then checks every layer that is left.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections import defaultdict
from typing import Iterable, Iterator

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops

from .errors import ModelError, one_line
from .hooks import trace_calls
from .interfaces import Layer, UnitGraph

log = logging.getLogger("cswap")
#: after this many seconds a trace that is still running says so (some timm models take minutes)
SLOW_TRACE_SECONDS = 30.0

# Module types a channel may pass through without being mixed with other channels.
_PER_CHANNEL = {
    ops.OPTYPE.BN, ops.OPTYPE.DEPTHWISE_CONV, ops.OPTYPE.PRELU, ops.OPTYPE.IN,
    ops.OPTYPE.ELEMENTWISE, ops.OPTYPE.CONCAT, ops.OPTYPE.SPLIT, ops.OPTYPE.RESHAPE,
    ops.OPTYPE.SLICE, ops.OPTYPE.UNBIND, ops.OPTYPE.EXPAND,
}
_WEIGHTED = {ops.OPTYPE.CONV, ops.OPTYPE.LINEAR}
_WHY_NOT = {
    ops.OPTYPE.LN: "a LayerNorm normalises over the channel, so zeroing is not removal",
    ops.OPTYPE.GN: "a GroupNorm normalises over the channel, so zeroing is not removal",
    ops.OPTYPE.OUTPUT: "the channels reach the model output",
    ops.OPTYPE.MHA: "nn.MultiheadAttention mixes the channels (use the vit adapter)",
    ops.OPTYPE.PARAMETER: "a bare nn.Parameter reads the channels",
    ops.OPTYPE.EMBED: "an embedding produces the channels",
    ops.OPTYPE.LSTM: "an LSTM reads the channels",
    ops.OPTYPE.CUSTOMIZED: "a custom module reads the channels",
}


def build_dependency_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    try:
        with torch.enable_grad(), _note_if_slow(f"torch-pruning is tracing {type(model).__name__}"):
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    except MemoryError:
        raise  # no second forward to find a culprit: the caller reports it (GenericAdapter.units)
    except Exception as exc:  # torch-pruning raises many kinds while tracing
        culprit = _first_failing_module(model, example_inputs)
        where = f" in module {culprit!r}" if culprit else ""
        raise ModelError(
            f"torch-pruning could not trace the model{where}: {type(exc).__name__}: {one_line(exc)}. "
            "Hint: tracing covers the whole forward, so ignored_layers cannot skip this; use an "
            "adapter written for this architecture (see docs/architectures.md)."
        ) from exc


@contextlib.contextmanager
def _note_if_slow(what: str, after: float | None = None) -> Iterator[None]:
    """Log a warning if the block is still running after `after` seconds: torch-pruning's
    index mapping takes minutes on models with many reshapes (timm RexNet, CoAtNet: over
    300 s), and a silent start-up that long looks like a hang."""
    after = SLOW_TRACE_SECONDS if after is None else after
    timer = threading.Timer(after, log.warning, args=(
        "%s: still running after %.0f s; on models with many reshapes and concatenations this "
        "can take minutes", what, after))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _first_failing_module(model: nn.Module, example_inputs: torch.Tensor) -> str | None:
    """Name the module whose forward raised, or else the first one that cuts the autograd
    graph (its input needs a gradient, its output has none: detach, no_grad, numpy...).
    torch-pruning traces through autograd, so either makes the model untraceable."""
    running: list[str] = []
    breakers: list[str] = []
    hooks = []
    for name, module in model.named_modules():
        def pre(mod, args, _name=name):
            running.append(_name)

        def post(mod, args, out, _name=name):
            if running and running[-1] == _name:
                running.pop()
            needs = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
            outs = _flatten(out)
            if needs and outs and not any(t.requires_grad for t in outs) and _name:
                breakers.append(_name)

        hooks.append(module.register_forward_pre_hook(pre))
        hooks.append(module.register_forward_hook(post))
    try:
        with torch.enable_grad():
            model(example_inputs.detach().clone().requires_grad_(True))
    except Exception:
        return running[-1] if running else None
    finally:
        for h in hooks:
            h.remove()
    return breakers[0] if breakers else None


def _trace_order_and_outputs(model: nn.Module,
                             example_inputs: torch.Tensor) -> tuple[dict[nn.Module, int], set[nn.Module]]:
    """Execution index of every module, and the modules whose output *is* a model output.

    torch-pruning marks a model output only when a non-module op produces it; a head such as
    `fc` returning the logits directly is found here instead.
    """
    produced: dict[int, nn.Module] = {}  # first (innermost) module to return each tensor
    alive: list[torch.Tensor] = []  # keeps ids unique while the forward runs

    def record(module, args, output) -> None:
        if isinstance(output, torch.Tensor):
            produced.setdefault(id(output), module)
            alive.append(output)

    trace = trace_calls(model, example_inputs, [m for m in model.modules() if m is not model], record)
    outputs = [t for t in _flatten(trace.output) if isinstance(t, torch.Tensor)]
    return trace.order, {produced[id(t)] for t in outputs if id(t) in produced}


def _flatten(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _flatten(o)]
    return []


def discover(model: nn.Module, example_inputs: torch.Tensor, ignored_layers: Iterable[nn.Module] = ()) -> UnitGraph:
    """Find the model's prunable layers with torch-pruning and order them output to input."""
    was_training = model.training
    model.eval()
    try:
        dg = build_dependency_graph(model, example_inputs)
        order, output_modules = _trace_order_and_outputs(model, example_inputs)
    finally:
        model.train(was_training)
    names = {m: n for n, m in model.named_modules()}
    param_names = {p: n for n, p in model.named_parameters()}
    layers, skipped = [], {}
    untraced = [names[m] for m in model.modules()
                if isinstance(m, (ops.TORCH_CONV, ops.TORCH_LINEAR)) and m not in dg.module2node]
    if untraced:
        culprit = _first_failing_module(model, example_inputs)
        if culprit is not None:
            raise ModelError(
                f"torch-pruning cannot trace {', '.join(untraced[:5])}: module {culprit!r} cuts the "
                "autograd graph (detach, no_grad or a non-torch operation). Hint: make it "
                "differentiable, or exclude the layers before it (adapter option ignored_layers)."
            )
        for name in untraced:
            skipped[name] = "not used in the forward pass"
    ignored = list(ignored_layers)
    # every channel of every group is followed through the graph: minutes on some models (timm
    # ECA-ResNets, RexNet: view/conv1d over channels), seconds elsewhere
    with _note_if_slow(f"torch-pruning is following every channel of {type(model).__name__} to group them"):
        for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=(ops.TORCH_CONV, ops.TORCH_LINEAR)):
            root = group[0].dep.target.module
            name = names[root]
            reason = _why_not_prunable(group, output_modules)
            layer = None if reason else _describe(group, name, names, param_names, order)
            reason = reason or _reads_out_of_range(layer, model)
            if reason:
                skipped[name] = reason
                continue
            layers.append(layer)
    layers.sort(key=lambda layer: (-layer.position, layer.name))
    return UnitGraph(layers, skipped, tuple(example_inputs.shape[1:]))


def _why_not_prunable(group, output_modules: set[nn.Module]) -> str | None:
    for item in group:
        module, kind = item.dep.target.module, item.dep.target.type
        if module in output_modules and (kind not in _WEIGHTED or item.dep.handler in _out_channel_fns(module)):
            return f"the channels reach the model output ({type(module).__name__})"
        if kind in _WHY_NOT:
            return f"{_WHY_NOT[kind]} ({type(module).__name__})"
        if kind == ops.OPTYPE.CONV and module.groups > 1:
            return f"grouped convolution {type(module).__name__}(groups={module.groups}) would become invalid"
        if kind not in _PER_CHANNEL and kind not in _WEIGHTED:
            return f"unsupported operation {kind.name} ({type(module).__name__})"
    return None


def _describe(group, name, names, param_names, order) -> Layer:
    root_module = group[0].dep.target.module
    channels = len(group[0].idxs)
    reads: dict[tuple[str, int], list[set[int]]] = {}
    frees: dict[tuple[str, int], list[set[int]]] = {}
    producers, modules = [], []
    for item in group:
        dep, module, kind = item.dep, item.dep.target.module, item.dep.target.type
        if not isinstance(module, nn.Module):
            continue
        out_fn = dep.handler in _out_channel_fns(module)
        if names.get(module) and names[module] not in modules:
            modules.append(names[module])
        per_root: dict[int, set[int]] = defaultdict(set)
        for idx, ridx in zip(item.idxs, item.root_idxs):
            per_root[ridx].add(int(idx))
        if kind in _WEIGHTED and not out_fn:  # a consumer: reads the channel through weight[:, idx]
            pname = param_names[module.weight]
            reads[(pname, 1)] = [per_root.get(c, set()) for c in range(channels)]
            frees[(pname, 1)] = reads[(pname, 1)]
        elif kind in _WEIGHTED or kind in _PER_CHANNEL:
            if kind in _WEIGHTED or kind == ops.OPTYPE.DEPTHWISE_CONV:
                producers.append(module)
            for pn, p in module.named_parameters(recurse=False):
                if p.dim() == 0 or (p.shape[0] == 1 and kind == ops.OPTYPE.PRELU):
                    continue
                frees[(param_names[p], 0)] = [per_root.get(c, set()) for c in range(channels)]
    position = max((order.get(m, -1) for m in producers), default=order.get(root_module, -1))
    return Layer(
        name=name,
        channels=channels,
        position=position,
        modules=modules,
        reads=[(p, d, [sorted(s) for s in per]) for (p, d), per in reads.items()],
        frees=[(p, d, [len(s) for s in per]) for (p, d), per in frees.items()],
    )


def _reads_out_of_range(layer: Layer, model: nn.Module) -> str | None:
    """torch-pruning's index mapping can send a channel past a consumer's input width (timm
    DPN's sliced dual paths): such a group cannot be cut, let alone removed."""
    params = dict(model.named_parameters())
    for pname, dim, per_channel in layer.reads:
        size = params[pname].shape[dim]
        worst = max((max(idx) for idx in per_channel if idx), default=-1)
        if worst >= size:
            return (f"torch-pruning maps its channels to input {worst} of {pname}, which has {size}: "
                    "its channel mapping through this model's slicing is wrong")
    return None


def _out_channel_fns(module: nn.Module) -> set:
    if isinstance(module, ops.TORCH_CONV):
        return {tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels}
    if isinstance(module, ops.TORCH_LINEAR):
        return {tp.prune_linear_out_channels}
    return set()
