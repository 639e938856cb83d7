"""The order of the kept tail: which of the units a progressive analysis kept go first when a
target asks for more than the removable ones.

C-SWAP and AMP remove units as they test them and keep the others (C-SWAP's critical units,
AMP's units above tau). A target beyond what they removed is met from that kept tail. The
paper orders it by effect alone, least harmful first (`critical_order: effect`). A target is
counted in parameters, and the units of a wide, late layer free many times the parameters of
an early one at a similar harm, so `effect_per_param` takes, one unit at a time, the unit
with the least harm per parameter it frees *now*, the greedy answer to "lose the least for
the parameters asked" (measured in docs/results/recovery.md). What a unit frees shrinks as
its neighbours go, so costs are counted as the plan will count them: after every removed
unit and every tail unit taken before it.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from torch import nn

from .interfaces import PlanStep, UnitGraph
from .options import CRITICAL_ORDERS
from .removal import ParamLedger


def order_tail(model: nn.Module, graph: UnitGraph, removed: Sequence[PlanStep], tail: Sequence[PlanStep],
               harm: Callable[[PlanStep], float], order: str) -> list[PlanStep]:
    """`tail` least harmful first, by `harm` alone (`effect`, a stable sort: ties keep the
    order they were tested in) or by harm per parameter freed (`effect_per_param`)."""
    if order == "effect":
        return sorted(tail, key=harm)
    if order != "effect_per_param":
        raise ValueError(f"unknown critical_order {order!r}; known: {', '.join(CRITICAL_ORDERS)}")
    ledger = ParamLedger(model, graph)
    remaining = {layer.name: layer.channels for layer in graph.layers}
    for step in removed:
        ledger.remove(step.unit)
        remaining[step.unit.layer] -= 1
    # a layer's channels free slices of one size, so its units go in harm order and each step
    # chooses among the layers' next units
    queues: dict[str, deque[PlanStep]] = {}
    for step in sorted(tail, key=harm):
        queues.setdefault(step.unit.layer, deque()).append(step)
    ordered = []
    while queues:
        layer = min(queues, key=lambda name: harm(queues[name][0]) / max(ledger.cost(queues[name][0].unit), 1))
        step = queues[layer].popleft()
        if remaining[layer] > 1:  # the plan never removes a layer's last unit (PruningPlan.build)
            ledger.remove(step.unit)
            remaining[layer] -= 1
        ordered.append(step)
        if not queues[layer]:
            del queues[layer]
    return ordered
