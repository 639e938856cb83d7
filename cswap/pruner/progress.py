"""Progress of an analysis: one bar over all its units.

One bar counted in units (not layers) gives an honest rate and time estimate, whatever the
sizes of the layers; its label names the layer being analysed.
"""
from __future__ import annotations

from tqdm.auto import tqdm

from ..interfaces import Layer, UnitGraph


class Progress:
    def __init__(self, graph: UnitGraph, enabled: bool):
        self.bar = tqdm(total=graph.num_units, desc="units", unit="unit", disable=not enabled)

    def start(self, layer: Layer) -> None:
        self.bar.set_postfix_str(layer.name)

    def advance(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
