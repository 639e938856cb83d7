"""Algorithm 1 of the paper, to be read beside it.

    for layer l in [L-1, ..., 1] (from the output side):
        for neuron n in layer l:
            cut n's outgoing connections                        (line 4)
            sigma* on S; xi_n; per-class paired t-tests; vote   (lines 5-6, Definitions 1-2)
            if n is not critical: keep the cut, G <- G*        (n is removed at once)
            else: keep n, remember xi_n                         (the critical buffer)
    critical units go only when a target asks for them, in `critical_order` (cswap/tail_order.py)

One addition to the paper: a test that asks for equivalence (`neutral: equivalent`) may call a
unit inconclusive (neither significant nor shown harmless). Such a unit is kept exactly as a
critical one is: what the test could not judge is never removed by this loop.

Everything that is not this loop lives in the walk it is handed (`cswap.pruner.walk.Walk`):
the baseline sigma (which becomes sigma* of each removed unit, so no extra pass is needed),
the engine that computes sigma*, replaying recorded decisions on resume, speculative unit
batches, checkpoints and progress. The opt-in group-testing variant is a loop of its own
(`cswap.pruner.fast.group_testing`).
"""
from __future__ import annotations

from typing import Iterable

from ..interfaces import Layer
from .record import KEPT


def algorithm1(walk, layers: Iterable[Layer]) -> None:
    """Visit every unit of `layers` (ordered from the output) and remove the non-critical ones."""
    for layer in layers:
        units = walk.order(layer)
        for i, unit in enumerate(units):
            if walk.remaining[layer.name] == 1:  # a layer keeps its last channel, untested
                walk.leave_untested(units[i:])
                break
            star, step = walk.test(unit, upcoming=units[i + 1:])
            if step.category in KEPT:  # critical, or inconclusive
                walk.keep(step)
            else:
                walk.remove([step], star)
        walk.finish(layer)
