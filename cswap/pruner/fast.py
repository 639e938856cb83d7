"""Opt-in fast modes of Algorithm 1: fewer unit-forward passes, a plan that may differ.

Their options are `cswap.options.FastOptions` (`pruning.fast`).

The exact algorithm tests every unit alone on the whole sample set S. Three shortcuts, each
off by default and each measured against the exact plan in `benchmarks/fast_modes.py`:

- **Group testing** (`group_testing`): a block of k units of one layer is cut jointly. If no
  group of the test sees a significant change, the whole block is neutral and removed at
  once; otherwise it is split in halves, down to single units, which get the exact test.
  `group_accept: non_critical` also removes a block whose joint verdict is detrimental, the
  way Algorithm 1 removes a single detrimental unit (for models with few neutral units).
  k adapts to the rate q of units a block must not hold (non-neutral ones) seen so far
  (Dorfman's rule: k = 1 + 1/sqrt(q), and no grouping once q >= 0.3, where pooling cannot
  save tests). A jointly neutral block contains
  no unit that would be critical alone only if effects do not cancel; that is the
  approximation, the paper's "group-wise relevance" open question.
- **Sequential testing** (`sequential`): the trial of a unit runs S in `looks` stratified
  parts; after each part but the last the test is applied at the strict level
  `interim_alpha`, and a unit already clearly *critical* there (a class significantly
  affected and, under Definition 2's global sign, xi significantly below zero) is kept
  without running the rest (Haybittle-Peto design: the final look uses the full alpha, so the
  overall type-I rate is at most alpha + (looks - 1) * interim_alpha). Only critical verdicts
  stop early, because a removed unit's full sigma* becomes the next baseline. The xi of an
  early-stopped unit is estimated on the part of S it saw (it only orders the critical tail).
- **Taylor screening** (`taylor_order`): before each layer, one backward pass gives the
  first-order estimate of every unit's xi (the cut zeroes the weights reading the unit, so
  d(objective) ~ -sum grad * weight over those slices), and units are visited from the
  smallest |estimate| up. Likely-neutral units then come first and form neutral blocks.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch
from scipy import stats
from torch import nn

from ..errors import ConfigError
from ..interfaces import (
    CRITICAL,
    DETRIMENTAL,
    NEUTRAL,
    Decision,
    Manifold,
    ScoringFunction,
    SignificanceTest,
    Unit,
    UnitGraph,
)
from ..options import FastOptions

# Above this share of units a block must not hold, testing a pool costs more tests than it saves
# (Dorfman 1943: pooling pays only while q < 1 - 3^(-1/3) ~ 0.31).
POOLING_LIMIT = 0.3


class GroupSizer:
    """Block size from the rate q of units a block must not hold (non-neutral ones, or critical
    ones with `group_accept: non_critical`) seen recently in this layer (decisions weighted
    by `memory` per unit, so a run of neutral units does not hide a dense stretch that
    follows, as in a Taylor-ordered layer), shrunk towards the rate over all layers so far,
    which starts at the q for which `initial` is the optimal block size."""

    def __init__(self, initial: int, maximum: int, memory: float = 0.9):
        self.maximum = max(initial, maximum)
        self.memory = memory
        self.prior = 1.0 / (initial - 1) ** 2
        self.total = [0.0, 0.0]  # rejected, decided: all layers
        self.layer = [0.0, 0.0]  # the same, this layer, recent decisions weighted more

    def new_layer(self) -> None:
        self.layer = [0.0, 0.0]

    def record(self, units: int, rejected: int) -> None:
        """`units` decided, `rejected` of which a block must not hold."""
        fade = self.memory ** units
        weight = (1 - fade) / (1 - self.memory)  # the units of a block fade like single ones
        self.layer = [self.layer[0] * fade + min(rejected, weight), self.layer[1] * fade + weight]
        self.total = [self.total[0] + rejected, self.total[1] + units]

    def rate(self) -> float:
        q_all = (self.total[0] + 2 * self.prior) / (self.total[1] + 2)
        return (self.layer[0] + 2 * q_all) / (self.layer[1] + 2)

    def size(self) -> int:
        q = self.rate()
        if q >= POOLING_LIMIT:
            return 1
        return int(min(self.maximum, max(2, round(1 + 1 / math.sqrt(q)))))


def clearly_critical(test: SignificanceTest, interim: SignificanceTest, sigma: np.ndarray, sigma_star: np.ndarray,
                     groups: np.ndarray, alpha: float) -> Decision:
    """The interim decision on the first samples of S, as `critical` only when it is clear.

    Under Definition 2's global sign the final verdict also depends on the sign of xi over
    all of S, and xi from a part of S is noisy (the relative effect is heavy-tailed upwards):
    a unit that hurts one class but helps more elsewhere would be called critical early and
    kept, although the full test calls it detrimental. So besides a significant class, an
    early critical verdict needs xi itself significantly below zero (one-sided t-test of the
    per-observation effects at `alpha`).
    """
    d = interim.decide(sigma, sigma_star[None, :], groups)[0]
    if d.category != CRITICAL or not test.verdict_by_sign:
        return d
    e = test.effect(sigma, sigma_star)
    if len(e) > 1 and np.std(e) > 0 and stats.ttest_1samp(e, 0.0, alternative="less").pvalue < alpha:
        return d
    return Decision(NEUTRAL if not d.significant else DETRIMENTAL, d.xi, d.p_values, d.significant)  # not clear yet


def stratified(manifold: Manifold, looks: int) -> tuple[Manifold, list[int]]:
    """S reordered so every part holds every class in proportion, and the batch counts after
    which the looks happen. Targets must be class-label tensors of shape (batch,);
    other tasks keep their order and look at batch boundaries."""
    batches = list(manifold)
    if not batches:
        return manifold, []
    targets = [y for _, y in batches]
    if all(torch.is_tensor(y) and y.dim() == 1 and not y.is_floating_point() for y in targets):
        inputs = torch.cat([x for x, _ in batches])
        labels = torch.cat(targets)
        # round-robin over classes: sample j of every class before sample j + 1 of any
        rank = torch.zeros_like(labels)
        for k in labels.unique():
            where = (labels == k).nonzero().flatten()
            rank[where] = torch.arange(len(where))
        order = torch.from_numpy(np.lexsort((labels.numpy(), rank.numpy())))
        size = max(len(t) for t in targets)
        parts = max(looks, math.ceil(len(labels) / size))
        bounds = np.linspace(0, len(labels), parts + 1).round().astype(int)
        batches = [(inputs[order[a:b]], labels[order[a:b]]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        manifold = Manifold(batches, dict(manifold.class_counts))
    n = len(batches)
    if n < 2:
        raise ConfigError("sequential testing needs S in at least two batches; lower the task's batch_size")
    marks = sorted({max(1, round(n * j / looks)) for j in range(1, looks)} - {n})
    return manifold, marks


def taylor_estimates(model: nn.Module, graph: UnitGraph, layer: str, manifold: Manifold,
                     scorer: ScoringFunction, relative: bool, device) -> dict[Unit, float]:
    """First-order estimate of each unit's xi in `layer` on the current network.

    The objective is mean log sigma when the test's effect is relative (d sigma / sigma
    = d log sigma; `SignificanceTest.relative_effect`) and mean sigma when it is absolute. A
    cut zeroes the weight slices W_c that read unit c, so its change is about
    -sum(grad(W_c) * W_c).
    """
    if not scorer.is_differentiable:
        raise ConfigError(f"Taylor ordering (pruning.fast.taylor_order) needs a differentiable scoring function; "
                          f"{type(scorer).__name__} declares none")
    params = dict(model.named_parameters())
    reads = graph.layer(layer).reads
    names = list(dict.fromkeys(p for p, _, _ in reads))  # a parameter may be read in several slices
    n = len(manifold)
    grads = {p: torch.zeros_like(params[p]) for p in names}
    with torch.enable_grad():
        for x, y in manifold:
            sigma = scorer.differentiable(model(x.to(device)), y.to(device) if torch.is_tensor(y) else y)
            objective = (torch.log(sigma.clamp_min(1e-12)) if relative else sigma).sum() / n
            for p, g in zip(names, torch.autograd.grad(objective, [params[p] for p in names], allow_unused=True)):
                if g is not None:
                    grads[p] += g
    estimate = np.zeros(graph.layer(layer).channels)
    for p, dim, per_channel in reads:
        contribution = (grads[p] * params[p].detach()).sum(dim=[d for d in range(params[p].dim()) if d != dim])
        for c, idx in enumerate(per_channel):
            estimate[c] -= float(contribution[idx].sum())
    return {Unit(layer, c): float(v) for c, v in enumerate(estimate)}


def group_testing(walk, layers, fast: FastOptions) -> None:
    """Algorithm 1 with blocks (`fast.group_testing`): a block of units of a layer is cut
    jointly and removed whole when the joint verdict allows (`fast.accepts`); any other
    block is split in halves, first half first, down to single units, which get the exact
    test. The block size follows the rate of units a block must not hold (`GroupSizer`)."""
    sizer = GroupSizer(fast.group_size, fast.max_group_size)
    for layer in layers:
        todo: deque[Unit] = deque(walk.order(layer))
        pending: deque[list[Unit]] = deque()  # halves of blocks that were not jointly accepted
        sizer.new_layer()
        while todo or pending:
            remaining = walk.remaining[layer.name]
            if remaining == 1:  # a layer cannot lose its last channel
                walk.leave_untested([u for block in pending for u in block] + list(todo))
                break
            size = min(sizer.size(), remaining - 1)  # never the rest of the layer
            block = pending.popleft() if pending else [todo.popleft() for _ in range(min(size, len(todo)))]
            if len(block) > size:  # a half of a split block, larger than the rate now allows
                pending.appendleft(block[size:])
                block = block[:size]
            if len(block) > 1:
                if not _remove_block(walk, block, fast, sizer):
                    sizer.record(1, 1)  # at least one unit in there that would not be removed alone
                    half = len(block) // 2
                    pending.extendleft([block[half:], block[:half]])
                continue
            star, step = walk.test(block[0])
            sizer.record(1, int(not fast.accepts(step.category)))
            if step.category == CRITICAL:
                walk.keep(step)
            else:
                walk.remove([step], star)
        walk.finish(layer)


def _remove_block(walk, block: list[Unit], fast: FastOptions, sizer: GroupSizer) -> bool:
    """Cut `block` jointly; remove it whole (every unit gets the block's verdict) if the joint
    verdict is accepted over all of S. Returns whether it was removed."""
    star, decision = walk.trials.trial(block, lambda d: not fast.accepts(d.category))
    if len(star.values) < len(walk.trials.base.values) or not fast.accepts(decision.category):
        return False
    steps = [walk.record.add(unit, decision, block=len(block)) for unit in block]
    for step in steps:
        sizer.record(1, int(not fast.accepts(step.category)))
    walk.remove(steps, star)
    return True
