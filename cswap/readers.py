"""The readers of removed units: the convolutions and linear layers whose input features a
removal takes away, and what the compensations and repairs need to know about them.

Shared by the compensated interventions (`cswap.compensation`) and the repairs after removal
(`cswap.recovery`): which input columns of a reader go and which stay, where a constant shift
of its output can be absorbed (its bias, or the BatchNorm right after it), its input as rows
of features (a convolution's unfolded patches) and its output as matching rows, and how to
read a module's input and output on a batch without running the rest of the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import trace_calls
from .interfaces import Layer, Unit, UnitGraph

BATCHNORM = nn.modules.batchnorm._BatchNorm


@dataclass
class Reader:
    """A convolution or linear layer that reads removed units: which of its input features
    (columns of the weight's dim 1, in the unpruned numbering) are gone."""

    name: str
    module: nn.Module
    removed: list[int]
    kept: list[int]
    bias_sink: str  # where a constant shift of its output goes: "bias", a BatchNorm's name, or ""


def find_readers(model: nn.Module, graph: UnitGraph, units: Iterable[Unit], probe: torch.Tensor) -> list[Reader]:
    """The readers of `units` in execution order, with their removed and kept input columns."""
    removed: dict[str, set[int]] = {}
    layers = {layer.name: layer for layer in graph.layers}
    for unit in units:
        for pname, dim, per_channel in layers[unit.layer].reads:
            if dim == 1 and per_channel[unit.channel]:
                removed.setdefault(Layer.module_of(pname), set()).update(per_channel[unit.channel])
    modules = dict(model.named_modules())
    sinks = bias_sinks(model, [modules[n] for n in removed], probe)
    order = trace_calls(model.eval(), probe, [modules[n] for n in removed]).order
    readers = []
    for name, gone in removed.items():
        module = modules[name]
        width = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        readers.append(Reader(name, module, sorted(gone), [i for i in range(width) if i not in gone], sinks[module]))
    return sorted(readers, key=lambda r: order.get(r.module, 1 << 30))


def bias_sinks(model: nn.Module, readers: list[nn.Module], probe: torch.Tensor) -> dict[nn.Module, str]:
    """Where each reader's constant output shift can go: its own bias, else a BatchNorm that
    takes the reader's output tensor as its input (found on a probe forward), else nowhere."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, nn.Module] = {}
    sinks = {r: "bias" for r in readers if r.bias is not None}

    def watch(module, args, output) -> None:
        if module in readers and torch.is_tensor(output):
            produced[id(output)] = module
        elif isinstance(module, BATCHNORM) and args and id(args[0]) in produced:
            sinks.setdefault(produced[id(args[0])], names[module])

    keep = []  # outputs stay alive during the forward, so their ids are unique
    trace_calls(model.eval(), probe, on_call=lambda m, a, o: (keep.append(o), watch(m, a, o)))
    return {r: sinks.get(r, "") for r in readers}


class _Stop(Exception):
    """Ends a forward pass once the module of interest has run."""


def module_io(model: nn.Module, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output of `module` when `model` runs on `x`, without running the rest."""
    seen: dict[str, torch.Tensor] = {}

    def hook(mod, args, output):
        seen["in"], seen["out"] = args[0].detach(), output.detach()
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["in"], seen["out"]


def features(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A reader's input as rows of features: a linear layer's last dim, or a convolution's
    unfolded patches (channel-major, as its weight is flattened)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def targets(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A reader's output as rows matching `_features` (positions, then samples)."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


def columns(module: nn.Module, channels: list[int]) -> torch.Tensor:
    """Columns of the flattened weight that belong to input channels `channels`."""
    k = 1 if isinstance(module, nn.Linear) else module.weight[0, 0].numel()
    return torch.tensor([c * k + i for c in channels for i in range(k)], dtype=torch.long)


def unsupported(reader: Reader) -> str:
    m = reader.module
    if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"):
        return ""
    return f"{type(m).__name__} (groups, padding mode or dimensionality) is not repaired"


def shift_output(model: nn.Module, reader: Reader, shift: torch.Tensor) -> None:
    """Add `shift` to the reader's output: to its bias, or as minus the running mean of the
    BatchNorm right after it (BN(y + s) with mean m is BN(y) with mean m - s)."""
    with torch.no_grad():
        if reader.bias_sink == "bias":
            reader.module.bias.add_(shift.to(reader.module.bias.device))
        else:
            bn = model.get_submodule(reader.bias_sink)
            bn.running_mean.sub_(shift.to(bn.running_mean.device))


def features_of_channels(module: nn.Module, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    dim = -1 if isinstance(module, nn.Linear) else 1
    return features(module, x.index_select(dim, channels.to(x.device)))
