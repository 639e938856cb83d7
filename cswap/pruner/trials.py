"""How a unit is tested: sigma* of the network with the unit cut, and the test's verdict.

`Trials` holds the engine (which owns the intervention), the significance test and the
baseline sigma of the network as it stands. A removal makes the trial's sigma* the new
baseline: it is exactly the new network's sigma, so no extra pass is needed. Two ways to
spend fewer passes on the same answer live here too: speculative unit batches
(`unit_batch`, exact) and, opt-in, sequential looks that end a clearly critical unit's trial
early (`fast.sequential`).
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

from ..compensation import make_intervention
from ..engine import make_engine
from ..errors import ConfigError
from ..interfaces import CRITICAL, Analysis, Decision, Layer, Manifold, Scores, Unit
from ..precision import with_precision
from .fast import clearly_critical, stratified, taylor_estimates
from .speculation import Speculation


class Trials:
    def __init__(self, analysis: Analysis, manifold: Manifold):
        self.analysis = analysis
        self.fast = analysis.options.fast
        self.work = copy.deepcopy(analysis.model).to(analysis.device).eval()
        self.significance = analysis.test
        self.marks: list[int] = []
        if self.fast.sequential:  # parts of S that each hold every class, looked at in turn
            manifold, self.marks = stratified(manifold, self.fast.looks)
            self.interim = analysis.test.with_alpha(self.fast.interim_alpha)
        self.manifold = manifold
        o = analysis.options
        intervention = make_intervention(o.intervention, self.work, analysis.units, analysis.model, manifold, o.ridge)
        self.engine = make_engine(o.engine, self.work, analysis.scorer, manifold, analysis.units,
                                  analysis.adapter.stages(self.work), analysis.device, intervention)
        self.engine = with_precision(self.engine, o.precision, analysis.device)  # fp32: the engine itself
        if self.fast.sequential and self.engine.world > 1:
            raise ConfigError("sequential testing runs in one process; drop torchrun or pruning.fast.sequential")
        self.base = self.engine.baseline()
        self.stale = False  # a replayed removal changed the network: sigma is recomputed before the next trial
        self.speculation = None if self.fast.enabled else Speculation(
            self.engine, analysis.options.unit_batch, analysis.device)
        self.count = self.batches = 0  # trials run, and batches of S they forwarded

    def test(self, unit: Unit, upcoming: Sequence[Unit]) -> tuple[Scores, Decision]:
        """sigma* with `unit` cut and the verdict; results for the next units of the layer
        may be computed ahead (speculation) and are used only while the network is unchanged."""
        self._refresh()
        if self.speculation and self.speculation.applies(unit.layer):
            star = self.speculation.scores(unit, list(upcoming), lambda: self.trial([unit], None)[0])
            return star, self.decide(star)
        return self.trial([unit], lambda d: d.category == CRITICAL)

    def trial(self, units: list[Unit], clear: Callable[[Decision], bool] | None) -> tuple[Scores, Decision]:
        """sigma* with `units` cut, and the test's decision. With sequential looks the trial
        ends at the first look where `clear(decision at the interim level)` holds; the
        decision returned is then that interim one (and the scores cover part of S)."""
        self._refresh()
        seen: list[Decision] = []

        def stop(partial: Scores) -> bool:
            n = len(partial.values)
            seen.append(clearly_critical(self.significance, self.interim, self.base.values[:n], partial.values,
                                         self.base.groups[:n], self.fast.interim_alpha))
            return clear(seen[-1])

        before = self.engine.batch_runs
        star = self.engine.trial(units, stop if self.fast.sequential else None, self.marks)
        self.count += 1
        self.batches += self.engine.batch_runs - before
        if len(star.values) < len(self.base.values):
            return star, seen[-1]
        return star, self.decide(star)

    def decide(self, star: Scores) -> Decision:
        return self.significance.decide(self.base.values, star.values[None, :], self.base.groups)[0]

    def remove(self, units: list[Unit], star: Scores) -> None:
        """The last trial's units stay cut; its sigma* is the new network's sigma."""
        exact = self.engine.commit(units)  # reduced precision: the fp32 sigma of the new network
        self.base = star if exact is None else exact
        self.network_changed()

    def replay_removal(self, unit: Unit) -> None:
        """A removal decided before an interruption: cut again, no test is re-run."""
        self.engine.cut(unit)
        self.stale = True

    def network_changed(self) -> None:
        if self.speculation:
            self.speculation.network_changed()

    def taylor_estimates(self, layer: Layer) -> dict[Unit, float]:
        a = self.analysis
        return taylor_estimates(self.work, a.units, layer.name, self.manifold, a.scorer, a.test.relative_effect,
                                a.device)

    def _refresh(self) -> None:
        if self.stale:  # sigma of the network the replay rebuilt
            self.base, self.stale = self.engine.baseline(), False
