"""Progress of an analysis: one bar over all its units.

One bar counted in units (not layers) gives an honest rate and time estimate, whatever the
sizes of the layers; its label names the layer being analysed. Decisions replayed on resume
take no time, so they move the bar without entering its rate (else the time left after a
resume would look like seconds). `note` is a line the console shows above the bar.
"""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

from ..interfaces import Layer, UnitGraph


class Progress:
    def __init__(self, graph: UnitGraph, enabled: bool):
        self.bar = tqdm(total=graph.num_units, desc="units", unit="unit", disable=not enabled)

    def start(self, layer: Layer) -> None:
        self.bar.set_postfix_str(layer.name)

    def advance(self, n: int) -> None:
        self.bar.update(n)

    def skip(self, n: int) -> None:
        """`n` units done without work (replayed): counted, but not in the rate."""
        if self.bar.disable:
            return
        self.bar.n += n
        self.bar.initial += n  # tqdm's average rate is (n - initial) / elapsed
        self.bar.last_print_n = self.bar.n
        self.bar.refresh()

    def note(self, text: str) -> None:
        if not self.bar.disable:
            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
