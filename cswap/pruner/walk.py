"""The network as Algorithm 1 walks it: what is left of each layer, how the next unit is
tested, and what a verdict does.

`Walk` is the one object the loops (`algorithm1`, `fast.group_testing`) talk to. It joins
the parts that each hold one concern: `Trials` (sigma* of a cut, the test, the baseline),
`Record` (decisions for checkpoints, resume and the plan), `Progress` (the bar).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from ..interfaces import Analysis, Layer, PlanStep, Scores, Unit
from .progress import Progress
from .record import KEPT, Record
from .trials import Trials

log = logging.getLogger("cswap")


class Walk:
    def __init__(self, analysis: Analysis, trials: Trials, record: Record, seed: int):
        self.trials, self.record = trials, record
        self.options = analysis.options
        self.remaining = {layer.name: layer.channels for layer in analysis.units.layers}
        self.progress = Progress(analysis.units, analysis.progress)
        self._rng = np.random.default_rng(seed)  # one permutation per layer, in layer order
        self._replayed = False  # the verdict being applied came from the resumed state

    def order(self, layer: Layer) -> list[Unit]:
        """The layer's units in the order they are tested: a seeded shuffle, then (opt-in)
        smallest first-order |xi| first (stable, so ties keep the seeded order)."""
        units = layer.units()
        if self.options.shuffle_units:
            units = [units[i] for i in self._rng.permutation(len(units))]
        if self.options.fast.taylor_order:
            estimate = self.trials.taylor_estimates(layer)
            units.sort(key=lambda u: abs(estimate[u]))
        self.trials.network_changed()  # nothing computed ahead outlives its layer
        self.progress.start(layer)
        return units

    def test(self, unit: Unit, upcoming: Sequence[Unit] = ()) -> tuple[Scores | None, PlanStep]:
        """The unit's verdict, recorded: replayed from a resumed run's state (no trial, no
        scores), or tested on the network as it stands."""
        replayed = self.record.replayed(unit)
        self._replayed = replayed is not None
        if replayed is not None:
            return None, self.record.add(unit, replayed)
        star, decision = self.trials.test(unit, upcoming)
        early = len(star.values) < len(self.trials.base.values)  # stopped at a look: clearly critical
        return star, self.record.add(unit, decision, **({"samples_seen": len(star.values)} if early else {}))

    def keep(self, step: PlanStep) -> None:
        """A critical or inconclusive unit stays; it joins the tail of the plan."""
        self.record.keep(step)
        self._advance(1)

    def remove(self, steps: list[PlanStep], star: Scores | None) -> None:
        """The units of `steps` (one, or a jointly tested block) go for good; the network is
        the trial's (sigma <- sigma*), or, for replayed decisions, re-cut without a trial.

        A step whose verdict keeps its unit (critical, inconclusive: `KEPT`) is kept instead,
        whoever asks: a loop that checks only for `critical` cannot remove what the test could
        not judge. The steps of one call share one verdict (a unit, or a jointly tested block)."""
        if any(s.category in KEPT for s in steps):
            if not all(s.category in KEPT for s in steps):
                raise RuntimeError("a jointly removed block mixes kept and removable verdicts")
            for step in steps:
                self.keep(step)
            return
        units = [s.unit for s in steps]
        if star is None:
            for unit in units:
                self.trials.replay_removal(unit)
        else:
            self.trials.remove(units, star)
        for step in steps:
            self.record.remove(step)
            self.remaining[step.unit.layer] -= 1
        self._advance(len(steps))

    def leave_untested(self, units: Sequence[Unit]) -> None:
        self.record.untested(units)
        self.progress.advance(len(units))

    def finish(self, layer: Layer) -> None:
        self.record.save(force=True)
        log.info("%s: %d of %d units removed", layer.name, layer.channels - self.remaining[layer.name], layer.channels)

    def _advance(self, n: int) -> None:
        (self.progress.skip if self._replayed else self.progress.advance)(n)
        self.record.save()
