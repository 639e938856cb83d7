"""Every decision as it is made: the state a resumed run replays, and the plan's two parts.

The state is the list of decisions so far (unit, category, xi, p-values), handed to the
caller's `checkpoint` at most every `seconds` and after each layer, so an interrupted run
loses at most those seconds. A resumed run visits the same units in the same order (the
order comes from the seed), so its first decisions are replayed from the state instead of
tested, and the plan is the one an uninterrupted run would give. The state also carries the
analysis seconds and passes over S spent so far, over every segment of a resumed run
(`analysis_seconds`, `passes`), so a report can cover the whole analysis.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Callable, Sequence

from ..interfaces import CRITICAL, CRITICAL_RANKED, INCONCLUSIVE, PROGRESSIVE, Decision, PlanStep, Ranking, Unit

CATEGORIES = ("neutral", "detrimental", "critical", "untested")
#: verdicts that keep a unit in the progressive phase: critical, and inconclusive (the test could
#: not show it harmless); both go to the kept tail, which only a target takes
KEPT = frozenset({CRITICAL, INCONCLUSIVE})


class Record:
    def __init__(self, recorded: list[dict], checkpoint: Callable[[dict], None] | None = None, seconds: float = 2.0,
                 spent: dict | None = None):
        self.recorded = recorded
        self.spent = {"analysis_seconds": 0.0, "passes": 0, **(spent or {})}  # by earlier segments
        self.passes: Callable[[], int] = lambda: 0  # this segment's passes over S (the walk sets the engine's)
        self.started = time.perf_counter()
        self.decisions: list[dict] = []
        self.removed: list[PlanStep] = []
        self.critical: list[PlanStep] = []
        self.protected: dict[str, str] = {}
        self.categories: Counter = Counter()
        self._checkpoint, self._seconds, self._last = checkpoint, seconds, time.perf_counter()

    def replayed(self, unit: Unit) -> PlanStep | None:
        """The recorded verdict of `unit` when resuming, else None."""
        if len(self.decisions) >= len(self.recorded):
            return None
        r = self.recorded[len(self.decisions)]
        if r["category"] == "untested" or r["unit"] != str(unit):
            raise RuntimeError(f"resume state does not match this analysis at {unit} ({r['unit']})")
        return PlanStep(unit, PROGRESSIVE, r["category"], r["xi"], p_values={int(k): v for k, v in r["p_values"].items()})

    def add(self, unit: Unit, verdict: Decision | PlanStep, **extra) -> PlanStep:
        """Record a verdict (a test's decision, or a replayed step); `extra` goes into the state."""
        step = verdict if isinstance(verdict, PlanStep) else PlanStep(
            unit, PROGRESSIVE, verdict.category, verdict.xi, p_values=verdict.p_values)
        self.categories[step.category] += 1
        self.decisions.append({"unit": str(unit), "category": step.category, "xi": step.xi,
                               "p_values": {str(k): v for k, v in step.p_values.items()}, **extra})
        return step

    def keep(self, step: PlanStep) -> None:
        """A kept unit (critical or inconclusive) joins the tail."""
        step.phase = CRITICAL_RANKED
        self.critical.append(step)

    def remove(self, step: PlanStep) -> None:
        self.removed.append(step)

    def untested(self, units: Sequence[Unit]) -> None:
        for unit in units:
            self.protected[str(unit)] = "last unit of its layer (not tested)"
            self.categories["untested"] += 1
            self.decisions.append({"unit": str(unit), "category": "untested"})

    def save(self, force: bool = False) -> None:
        if self._checkpoint and (force or time.perf_counter() - self._last >= self._seconds):
            self._checkpoint({"decisions": self.decisions, **self.totals()})
            self._last = time.perf_counter()

    def totals(self) -> dict:
        """Seconds and passes over S of the whole analysis so far, earlier segments included."""
        return {"analysis_seconds": round(self.spent["analysis_seconds"] + time.perf_counter() - self.started, 3),
                "passes": int(self.spent["passes"]) + self.passes()}

    def counts(self) -> dict[str, int]:
        """Units per category. `inconclusive` is counted only when the test made such verdicts,
        so a plan of the paper's rule (which cannot) keeps the four categories it always had."""
        counts = {k: self.categories.get(k, 0) for k in CATEGORIES}
        if self.categories.get(INCONCLUSIVE, 0):
            counts[INCONCLUSIVE] = self.categories[INCONCLUSIVE]
        return counts

    def tested(self) -> int:
        """Units the test judged (every category but `untested`)."""
        return sum(v for k, v in self.categories.items() if k != "untested")

    def ranking(self, meta: dict, order: Callable[[list[PlanStep], list[PlanStep]], list[PlanStep]]) -> Ranking:
        """Removed units in the order they went, then the kept ones (critical and inconclusive)
        as `order(removed, kept)` puts them (cswap/tail_order.py; `kept` is in the order they
        were tested)."""
        tail = order(self.removed, self.critical)
        return Ranking("cswap", self.removed + tail, meta, dict(self.protected))
