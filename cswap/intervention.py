"""Cutting units of a live model, and undoing cuts: Algorithm 1's intervention.

Cutting a unit's outgoing connections zeroes the weight slices through which every reader
takes it (the layer's `reads`), so the reader computes what it would without the unit: the
intervened network equals the physically pruned one (checked for every layer up front by
`cswap.verify`, and for the whole plan after every run). The engine owns the intervention
it evaluates (`cswap.engine`).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

from .interfaces import Unit, UnitGraph


class Intervention:
    """Cuts units of a live model by zeroing the weights that read them, and undoes cuts.

    The model must be the one the UnitGraph was discovered on (parameters are found by name).
    Slices of different units never overlap, so restoring one unit from the saved original
    weights never touches another unit's cut.

    This is the paper's intervention (`pruning.intervention: zero`); `cswap.compensation` has
    the compensated ones, which also change what the unit's readers compute.
    """

    #: whether the staged engine may score several units of a layer in one pass by zeroing
    #: their input features per copy (what this cut does, and nothing more)
    batchable = True

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

    def cut_all(self, units: Iterable[Unit]) -> None:
        """Cut `units` for good (one unit, or a block tested jointly)."""
        for unit in units:
            self.cut(unit)

    def restore(self, unit: Unit) -> None:
        with torch.no_grad():
            for pname, dim, index in self._slices.get(str(unit), []):
                original = self._originals[pname].index_select(dim, index)
                self._params[pname].index_copy_(dim, index, original)
        self.cut_units.discard(unit)

    @contextlib.contextmanager
    def trial(self, units: Iterable[Unit]) -> Iterator[None]:
        """Cut `units` for the duration of the block, then restore them (last cut first, so a
        cut that saved state on top of another's gives it back in order)."""
        units = [u for u in units if u not in self.cut_units]
        for u in units:
            self.cut(u)
        try:
            yield
        finally:
            for u in reversed(units):
                self.restore(u)
