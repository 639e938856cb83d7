"""Physical removal of units with torch-pruning, and the exact count of what it frees.

`ParamLedger` counts the parameters a removal frees without touching the model, so a plan's
steps carry their cost and a ratio is replayed to within one unit's cost. `Remover`,
`prune_units` and `remove_units` (through a model's adapter) delete the units' slices for
real, so parameters, MACs and latency drop.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
from torch import nn

from .discovery import build_dependency_graph
from .errors import ModelError, one_line
from .interfaces import Unit, UnitGraph


class ParamLedger:
    """Counts the parameters that removing units frees, exactly, without touching the model.

    Removing channel c of a layer deletes, in every parameter it appears in, a slice whose
    size is the product of that parameter's *current* other dimensions; tracking current
    shapes makes the running count equal what physical removal leaves (tested against it).
    """

    def __init__(self, model: nn.Module, graph: UnitGraph):
        self.shapes = {n: list(p.shape) for n, p in model.named_parameters()}
        self.total = count_params(model)
        self.removed = 0
        self._layers = {layer.name: layer for layer in graph.layers}

    def remove(self, unit: Unit) -> int:
        """Account for removing `unit`; returns the parameters it freed."""
        freed = self._free(unit, self.shapes)
        self.removed += freed
        return freed

    def cost(self, unit: Unit) -> int:
        """The parameters removing `unit` would free now (nothing is accounted)."""
        return self._free(unit, {n: list(self.shapes[n]) for n, _, _ in self._layers[unit.layer].frees})

    def _free(self, unit: Unit, shapes: dict[str, list[int]]) -> int:
        freed = 0
        for pname, dim, counts in self._layers[unit.layer].frees:
            n = counts[unit.channel]
            if n == 0:
                continue
            shape = shapes[pname]
            rest = 1
            for i, s in enumerate(shape):
                if i != dim:
                    rest *= s
            freed += rest * n
            shape[dim] -= n
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


def remove_units(model: nn.Module, units: Iterable[Unit], adapter, input_shape: tuple[int, ...]) -> nn.Module:
    """Physically remove `units` (numbered as on the unpruned model) from `model` in place, the
    way its adapter does: the adapter's own removal for units that are not torch-pruning
    channels (ViT heads), else torch-pruning traced on a zero input of `input_shape`; then
    the adapter's attribute fixes. Shapes only: compensation and recovery are the replay's."""
    units = list(units)
    if adapter.removes_units:
        adapter.remove(model, units)
    else:
        p = next(model.parameters())
        prune_units(model, torch.zeros((1, *input_shape), device=p.device, dtype=p.dtype), units)
    adapter.after_pruning(model)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
