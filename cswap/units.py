"""Pruning units on torch-pruning's DependencyGraph, their interventions and their removal.

A *layer* here is one torch-pruning dependency group: channels coupled across modules (a
residual stream couples every convolution that writes into it). A *unit* is one channel of
such a group. Cutting a unit's outgoing connections (Algorithm 1, line 4) means zeroing the
weights through which every consumer reads it, i.e. the group's input-channel slices of
convolutions and linear layers. That is exactly physical removal as long as nothing else
reads the channel; groups where something else does (a LayerNorm or GroupNorm mixes the
channel into its statistics, the channel is a model output, a grouped convolution would be
left invalid) are reported as not prunable with the reason, never approximated.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops

from .errors import ModelError

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


@dataclass(frozen=True, order=True)
class Unit:
    """One channel of a layer (dependency group), named by the group's root module."""

    layer: str
    channel: int

    def __str__(self) -> str:
        return f"{self.layer}:{self.channel}"

    @classmethod
    def parse(cls, text: str) -> "Unit":
        layer, _, channel = text.rpartition(":")
        return cls(layer, int(channel))


@dataclass
class Layer:
    """A dependency group: the coupled channels, who reads them, and what removing one frees."""

    name: str  # root module name: stable across copies of the same architecture
    channels: int
    position: int  # execution index of its last producer: larger is nearer the output
    modules: list[str]
    # consumer weight slices: (parameter name, dim, per-channel indices in that parameter)
    reads: list[tuple[str, int, list[list[int]]]] = field(default_factory=list)
    # every parameter slice that physical removal deletes: (parameter name, dim, per-channel count)
    frees: list[tuple[str, int, list[int]]] = field(default_factory=list)

    def units(self) -> list[Unit]:
        return [Unit(self.name, c) for c in range(self.channels)]


@dataclass
class UnitGraph:
    """The prunable layers of a model, ordered from output to input, plus those left out."""

    layers: list[Layer]
    skipped: dict[str, str]  # layer name -> why it is not prunable
    input_shape: tuple[int, ...]
    # layers kept although their cut could not be checked against removal (see cswap.verify)
    unverified: dict[str, str] = field(default_factory=dict)

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no prunable layer {name!r}")

    @property
    def num_units(self) -> int:
        return sum(layer.channels for layer in self.layers)

    def verified(self, model: nn.Module, adapter, example_inputs: torch.Tensor) -> "UnitGraph":
        """This graph with every layer whose cut is not its removal moved to `skipped`
        (`cswap.verify.verify_units`; the core calls it wherever it builds units for a run)."""
        from .verify import verify_units

        return verify_units(model, self, adapter, example_inputs)


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


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to `limit` characters: errors a user reads
    (CSwapError messages, skip reasons) are one line each."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def _trace_order_and_outputs(model: nn.Module, example_inputs: torch.Tensor) -> tuple[dict[nn.Module, int], set[nn.Module]]:
    """Execution index of every module, and the modules whose output *is* a model output.

    torch-pruning marks a model output only when a non-module op produces it; a head such as
    `fc` returning the logits directly is found here instead.
    """
    order: dict[nn.Module, int] = {}
    produced: dict[int, nn.Module] = {}  # first (innermost) module to return each tensor
    alive: list[torch.Tensor] = []  # keeps ids unique while the forward runs

    def record(module, args, output) -> None:  # a hook must return None to keep the output
        order.setdefault(module, len(order))
        if isinstance(output, torch.Tensor):
            produced.setdefault(id(output), module)
            alive.append(output)

    hooks = [m.register_forward_hook(record) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            out = model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
    outputs = [t for t in _flatten(out) if isinstance(t, torch.Tensor)]
    return order, {produced[id(t)] for t in outputs if id(t) in produced}


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


class Intervention:
    """Cuts units of a live model by zeroing the weights that read them, and undoes cuts.

    The model must be the one the UnitGraph was discovered on (parameters are found by name).
    Slices of different units never overlap, so restoring one unit from the saved original
    weights never touches another unit's cut.
    """

    def __init__(self, model: nn.Module, graph: UnitGraph):
        params = dict(model.named_parameters())
        self._slices: dict[str, list[tuple[torch.Tensor, int, torch.Tensor]]] = {}
        self._originals: dict[str, torch.Tensor] = {}
        for layer in graph.layers:
            for pname, dim, per_channel in layer.reads:
                p = params[pname]
                self._originals.setdefault(pname, p.detach().clone())
                for c, idx in enumerate(per_channel):
                    if idx:
                        index = torch.tensor(idx, dtype=torch.long, device=p.device)
                        self._slices.setdefault(f"{layer.name}:{c}", []).append((pname, dim, index))
        self._params = params
        self.cut_units: set[Unit] = set()

    def cut(self, unit: Unit) -> None:
        with torch.no_grad():
            for pname, dim, index in self._slices.get(str(unit), []):
                self._params[pname].index_fill_(dim, index, 0.0)
        self.cut_units.add(unit)

    def restore(self, unit: Unit) -> None:
        with torch.no_grad():
            for pname, dim, index in self._slices.get(str(unit), []):
                original = self._originals[pname].index_select(dim, index)
                self._params[pname].index_copy_(dim, index, original)
        self.cut_units.discard(unit)

    @contextlib.contextmanager
    def trial(self, units: Iterable[Unit]) -> Iterator[None]:
        """Cut `units` for the duration of the block, then restore them."""
        units = [u for u in units if u not in self.cut_units]
        for u in units:
            self.cut(u)
        try:
            yield
        finally:
            for u in units:
                self.restore(u)


class ParamLedger:
    """Counts the parameters that removing units frees, exactly, without touching the model.

    Removing channel c of a layer deletes, in every parameter it appears in, a slice whose
    size is the product of that parameter's *current* other dimensions; tracking current
    shapes makes the running count equal what physical removal leaves (tested against it).
    """

    def __init__(self, model: nn.Module, graph: UnitGraph):
        self.shapes = {n: list(p.shape) for n, p in model.named_parameters()}
        self.total = sum(p.numel() for p in model.parameters())
        self.removed = 0
        self._layers = {layer.name: layer for layer in graph.layers}

    def remove(self, unit: Unit) -> int:
        """Account for removing `unit`; returns the parameters it freed."""
        freed = 0
        for pname, dim, counts in self._layers[unit.layer].frees:
            n = counts[unit.channel]
            if n == 0:
                continue
            shape = self.shapes[pname]
            rest = 1
            for i, s in enumerate(shape):
                if i != dim:
                    rest *= s
            freed += rest * n
            shape[dim] -= n
        self.removed += freed
        return freed


class Remover:
    """Physical removal with torch-pruning on one model, traced once for several removals.

    Each `remove` call deletes channels of layers not touched by an earlier call, numbered
    as on the unpruned model (channels of different layers never renumber each other).
    `prune_units` is one call; `cswap.verify` removes layer after layer on one copy.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor):
        self.model = model
        was_training = model.training
        model.eval()
        try:
            self.graph = build_dependency_graph(model, example_inputs)
        finally:
            model.train(was_training)

    def remove(self, units: Iterable[Unit]) -> nn.Module:
        by_layer: dict[str, list[int]] = defaultdict(list)
        for u in units:
            by_layer[u.layer].append(u.channel)
        for name, channels in by_layer.items():
            module = self.model.get_submodule(name)
            pruner = self.graph.get_pruner_of_module(module)
            try:
                group = self.graph.get_pruning_group(module, pruner.prune_out_channels, sorted(set(channels)))
                group.prune()
            except Exception as exc:  # torch-pruning raises assorted errors on layers it cannot cut
                raise ModelError(
                    f"torch-pruning could not remove channels of layer {name!r}: {type(exc).__name__}: {one_line(exc)}. "
                    "Hint: leave that layer out (adapter option ignored_layers)."
                ) from exc
        return self.model


def prune_units(model: nn.Module, example_inputs: torch.Tensor, units: Iterable[Unit]) -> nn.Module:
    """Physically remove `units` from `model` in place with torch-pruning.

    The result depends only on the set of units: each layer is pruned once with all of its
    channels in their original numbering, so the order of `units` does not matter.
    """
    units = list(units)
    if not units:
        return model
    return Remover(model, example_inputs).remove(units)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
