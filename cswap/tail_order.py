"""The order of the kept tail: which of the units a progressive analysis kept go first when a
target asks for more than the removable ones, and which layers a plan leaves too thin.

C-SWAP and AMP remove units as they test them and keep the others (C-SWAP's critical units,
AMP's units above tau). A target beyond what they removed is met from that kept tail. The
paper orders it by effect alone, least harmful first (`critical_order: effect`). A target is
counted in parameters, and the units of a wide, late layer free many times the parameters of
an early one at a similar harm, so `effect_per_param` takes, one unit at a time, the unit
with the least harm per parameter it frees *now*, the greedy answer to "lose the least for
the parameters asked" (measured in docs/results/recovery.md). What a unit frees shrinks as
its neighbours go, so costs are counted as the plan will count them: after every removed
unit and every tail unit taken before it.

Each unit's harm was measured with the rest of its layer in place, and harms do not add up:
the greedy per-parameter order empties the layer whose units free the most (the last
convolution of a small CNN, MobileNetV2's last 1x1 convolution: 6 of 128 channels at 70 %
removed, and no repair brings such a bottleneck back; issue #27). That matters only where a
layer is a bottleneck: where emptying it cuts the output off from the input
(`bottleneck_layers`, two forward passes per layer on random inputs). A layer a skip
connection bypasses (a residual block's inner convolution, a transformer's MLP or heads) can
go: its block becomes an identity, and the per-parameter order took ViT MLPs to 3 % of their
width at no loss. On bottlenecks, `effect_per_param_thinning` grows a unit's harm by how much
of its layer is gone, (width / remaining) ** `thinning_power` (each layer's scaled harms then
only grow, so this greedy is also the allocation across layers that water-filling over the
measured harms would solve, at every target at once), and a floor (`pruning.min_width`, a
share of the width and an absolute minimum) holds each bottleneck until no other unit is
left: units below a floor go last, in the same order. Measured in docs/results/tail_order.md.
`kept_tail` is what an analysis calls; it records in the plan what it used (the order, the
floor, the bottlenecks), so a replay can name the layers it leaves below their floor.
"""
from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .interfaces import PlanStep, UnitGraph
from .intervention import Intervention
from .options import CRITICAL_ORDERS, AnalysisOptions, MinWidth
from .removal import ParamLedger

THINNING = "effect_per_param_thinning"
NO_FLOOR = MinWidth(share=0.0, minimum=1)  # the plan's own rule: a layer keeps one unit


@dataclass(frozen=True)
class ThinLayer:
    """A layer a plan's prefix left narrower than its floor."""

    name: str
    width_before: int
    width_after: int
    floor: int


def kept_tail(options: AnalysisOptions, model: nn.Module, graph: UnitGraph, removed: Sequence[PlanStep],
              kept: Sequence[PlanStep], harm: Callable[[PlanStep], float]) -> tuple[list[PlanStep], dict]:
    """The kept tail in `options.critical_order`, with the floor `options.min_width` in the
    per-parameter orders (`effect` stays the paper's sort, floorless), and what the plan's
    meta must record of it: nothing for the paper's order (its plans read as before), else the
    order, the floor and the probed bottlenecks, so a replay names the layers it leaves below
    their floor without probing the model again (cswap/collapse.py)."""
    order, floor = options.critical_order, options.min_width
    if order == "effect":
        return order_tail(model, graph, removed, kept, harm, order), {}
    meta: dict = {"critical_order": order, "min_width": floor.model_dump()}
    bottlenecks = None  # order_tail probes them only when the order or the floor reads them
    if order == THINNING or not floor.trivial:
        bottlenecks = bottleneck_layers(model, graph)
        meta["bottlenecks"] = sorted(bottlenecks)
    return order_tail(model, graph, removed, kept, harm, order, floor, bottlenecks=bottlenecks), meta


def order_tail(model: nn.Module, graph: UnitGraph, removed: Sequence[PlanStep], tail: Sequence[PlanStep],
               harm: Callable[[PlanStep], float], order: str, floor: MinWidth = NO_FLOOR,
               thinning_power: float = 1.0, bottlenecks: Collection[str] | None = None) -> list[PlanStep]:
    """`tail` in `order`, least harmful first: by `harm` alone (`effect`), by harm per
    parameter freed (`effect_per_param`), or by harm per parameter grown, in a bottleneck, as
    the layer thins (`effect_per_param_thinning`, factor (width / remaining) **
    thinning_power). Every order first takes the units above each bottleneck's `floor`, then
    the rest in the same order. `bottlenecks`: layer names (default: `bottleneck_layers`,
    probed only when a floor or the thinning order needs them)."""
    if order not in CRITICAL_ORDERS:
        raise ValueError(f"unknown critical_order {order!r}; known: {', '.join(CRITICAL_ORDERS)}")
    width = {layer.name: layer.channels for layer in graph.layers}
    floored = any(floor.of(w) > 1 for w in width.values())
    if order == "effect" and not floored:  # the paper's stable sort, ties in test order
        return sorted(tail, key=harm)
    if bottlenecks is None:
        bottlenecks = bottleneck_layers(model, graph) if floored or order == THINNING else ()
    floors = {name: floor.of(w) if name in bottlenecks else 1 for name, w in width.items()}
    thins = order == THINNING and thinning_power != 0
    ledger = ParamLedger(model, graph)
    remaining = dict(width)
    for step in removed:
        ledger.remove(step.unit)
        remaining[step.unit.layer] -= 1

    def score(step: PlanStep) -> float:
        h = harm(step)
        if order == "effect":
            return h
        layer = step.unit.layer
        grown = (width[layer] / remaining[layer]) ** thinning_power if thins and layer in bottlenecks else 1.0
        return (h * grown if h > 0 else h / grown) / max(ledger.cost(step.unit), 1)

    # a layer's channels free slices of one size and share a width, so its units go in harm
    # order and each step chooses among the layers' next units
    queues: dict[str, deque[PlanStep]] = {}
    for step in sorted(tail, key=harm):
        queues.setdefault(step.unit.layer, deque()).append(step)
    above = _greedy(queues, score, ledger, remaining, floors)
    return above + _greedy(queues, score, ledger, remaining, {name: 1 for name in width})


def _greedy(queues: dict[str, deque[PlanStep]], score: Callable[[PlanStep], float], ledger: ParamLedger,
            remaining: dict[str, int], floors: Mapping[str, int]) -> list[PlanStep]:
    """Take, one at a time, the queue head of least `score`, counting what it frees; a layer
    at a floor above 1 stops (its queue stays for a later call); at the trivial floor a
    layer's last unit is ordered but not counted (PruningPlan.build never removes it)."""
    ordered = []
    open_layers = {name for name in queues if not 1 < floors[name] >= remaining[name]}
    while open_layers:  # ties go to the layer queued first, as `min` over the dict
        layer = min((name for name in queues if name in open_layers), key=lambda name: score(queues[name][0]))
        step = queues[layer].popleft()
        if remaining[layer] > 1:
            ledger.remove(step.unit)
            remaining[layer] -= 1
        ordered.append(step)
        if not queues[layer] or 1 < floors[layer] >= remaining[layer]:
            open_layers.discard(layer)
        if not queues[layer]:
            del queues[layer]
    return ordered


@torch.no_grad()
def bottleneck_layers(model: nn.Module, graph: UnitGraph, samples: int = 2, seed: int = 0) -> set[str]:
    """The layers whose emptying (every unit cut) leaves the model's output the same for
    every input: what flows from input to output passes through them. Probed on a copy with
    `samples` seeded random inputs of the graph's input shape: a layer is a bottleneck when
    the outputs' spread across the inputs falls below 1e-6 of the uncut model's (zero up to
    round-off, where a bypassed layer leaves them of the same order). A model whose output
    does not depend on these inputs at all makes every layer a bottleneck."""
    probe = copy.deepcopy(model).eval()
    first = next(probe.parameters(), None)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((samples, *graph.input_shape), generator=g)
    x = x.to(first.device, first.dtype) if first is not None else x
    reference = _spread(probe(x))
    intervention = Intervention(probe, graph)
    out = set()
    for layer in graph.layers:
        with intervention.trial(layer.units()):
            if reference == 0 or _spread(probe(x)) <= 1e-6 * reference:
                out.add(layer.name)
    return out


def _spread(output) -> float:
    """Largest difference between the first sample's outputs and the others' (tensors,
    or tuples, lists and dicts of them)."""
    if isinstance(output, torch.Tensor):
        return (output[1:] - output[:1]).abs().max().item() if output.is_floating_point() and len(output) > 1 else 0.0
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else ()
    return max((_spread(item) for item in items), default=0.0)


def widths_after(widths: Mapping[str, int], removed_layers: Iterable[str]) -> dict[str, int]:
    """Each layer's width after removing one unit per entry of `removed_layers` (the layer
    names of a replayed prefix's units, e.g. `[s.unit.layer for s in plan.steps[:k]]`)."""
    after = dict(widths)
    for name in removed_layers:
        after[name] -= 1
    return after


def layers_below_floor(widths: Mapping[str, int], after: Mapping[str, int], floor: MinWidth,
                       bottlenecks: Collection[str] | None = None) -> list[ThinLayer]:
    """The bottlenecks narrower than `floor` after pruning (what a run summary should name: a
    target past the floors thins a layer that no repair widens again), most thinned first.
    `widths` are the unpruned widths (`PruningPlan.layers`); `after` the pruned ones, from
    `widths_after` or counted on the pruned model (layers missing from it are unchanged);
    `bottlenecks` the layers that count (`bottleneck_layers`; default: every layer)."""
    thin = [ThinLayer(name, w, after.get(name, w), floor.of(w)) for name, w in widths.items()
            if after.get(name, w) < floor.of(w) and (bottlenecks is None or name in bottlenecks)]
    return sorted(thin, key=lambda t: (t.width_after / t.width_before, t.name))
