"""Replaying a plan to aligned widths (`pruning.round_to: k`), the way Torch-Pruning's `round_to` does.

Why: a structured pruning that leaves a layer 13 channels wide often runs no faster than 16, and
sometimes slower: vector units, cuDNN/oneDNN kernels and tensor cores work on blocks of 8 or 16
channels, and widths that do not fill them waste the rest of the block. Keeping every pruned
layer's width a multiple of k is the most common cure for "no speed-up after pruning".

How: alignment is a property of the replay, not of the analysis, so any existing plan can be
replayed aligned. A replay of the first m steps removes m_l units of each layer l; aligned, it
removes instead the count n_l nearest to m_l for which the layer's remaining width is a
multiple of k (ties hold back), always the layer's first n_l units in the plan's order: the last
units of a layer's share are held back, or the layer's next units in the plan brought forward.
A layer the replay does not touch keeps its width (0 is always allowed), and a layer narrower
than k is never pruned. The removed set grows with m (n_l is monotone in m_l), so for a target
the smallest m whose aligned set reaches it is found by bisection (`cswap.bisection`), and
the result lands within one aligned block of the target instead of one unit.
"""
from __future__ import annotations

from collections import defaultdict
from .interfaces import PlanStep, Unit


def layer_orders(steps: list[PlanStep]) -> dict[str, list[int]]:
    """Per layer, the positions of its steps in the plan, in order."""
    orders: dict[str, list[int]] = defaultdict(list)
    for i, step in enumerate(steps):
        orders[step.unit.layer].append(i)
    return orders


def aligned_count(channels: int, wanted: int, available: int, k: int) -> int:
    """The count nearest to `wanted` (ties: the smaller) among 0 and the counts n <= `available`
    that leave `channels - n` a positive multiple of `k`."""
    feasible = [n for n in range(channels % k, available + 1, k) if n > 0 and channels - n >= k]
    return min([0, *feasible], key=lambda n: (abs(n - wanted), n))


def prefix_units(steps: list[PlanStep], layers: dict[str, int], m: int, round_to: int | None) -> list[Unit]:
    """The units a replay of the first `m` steps removes, in plan order: the steps' own units,
    or with `round_to` each layer's count made aligned (`aligned_count`)."""
    if not round_to:
        return [s.unit for s in steps[:m]]
    return aligned_units(steps, layers, m, round_to)


def aligned_units(steps: list[PlanStep], layers: dict[str, int], m: int, k: int) -> list[Unit]:
    """The units an aligned replay of the first `m` steps removes, in plan order."""
    chosen: list[int] = []
    for layer, positions in layer_orders(steps).items():
        wanted = sum(1 for i in positions if i < m)
        chosen += positions[:aligned_count(int(layers[layer]), wanted, len(positions), k)]
    return [steps[i].unit for i in sorted(chosen)]
