"""Algorithm 1: progressive C-SWAP.

Layers are visited from the output to the input. Each unit is cut, sigma* is computed on
the whole sample set S, and the significance test decides. A non-critical unit (neutral or
detrimental) is removed at once, and its sigma* becomes the baseline sigma for the next unit:
the network has changed, and that is exactly the new network's sigma, so no extra pass is
needed. Critical units are kept with their xi; they form the tail of the plan, least
beneficial (largest xi) first, to be removed only when a target ratio asks for it.

Removal during the analysis is by intervention (zeroed reads), which equals physical
removal (tested), so the model is never re-traced; the plan is replayed physically at the end.
"""
from __future__ import annotations

import copy
import logging
import time
from collections import Counter

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .causal import CRITICAL
from .errors import NumericalError
from .interfaces import Manifold, Scores, ScoringFunction, SignificanceTest
from .plan import CRITICAL_RANKED, PROGRESSIVE, PlanStep, PruningPlan
from .units import Intervention, UnitGraph

log = logging.getLogger("cswap")


class ScoreEvaluator:
    """sigma of a network on S: one forward pass over the fixed batches of the manifold."""

    def __init__(self, scorer: ScoringFunction, manifold: Manifold, device: torch.device | str = "cpu"):
        self.scorer = scorer
        self.batches = [(x.to(device), y.to(device) if torch.is_tensor(y) else y) for x, y in manifold]
        self.passes = 0

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> Scores:
        values, groups = [], []
        for x, y in self.batches:
            s = self.scorer.score(model(x), y)
            values.append(np.asarray(s.values, dtype=np.float64))
            groups.append(np.asarray(s.groups))
        self.passes += 1
        out = Scores(np.concatenate(values), np.concatenate(groups))
        if not np.isfinite(out.values).all():
            raise NumericalError(
                f"the scoring function returned {int((~np.isfinite(out.values)).sum())} NaN/inf "
                "values; check the model weights and the input normalisation"
            )
        return out


def progressive_prune(
    model: nn.Module,
    graph: UnitGraph,
    manifold: Manifold,
    scorer: ScoringFunction,
    test: SignificanceTest,
    *,
    adapter: str,
    seed: int = 0,
    shuffle_units: bool = True,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> PruningPlan:
    """Run Algorithm 1 on a copy of `model` and return its plan (the model is not changed)."""
    started = time.perf_counter()
    work = copy.deepcopy(model).to(device).eval()
    cut = Intervention(work, graph)
    sigma_of = ScoreEvaluator(scorer, manifold, device)
    base = sigma_of(work)
    rng = np.random.default_rng(seed)
    removed: list[PlanStep] = []
    critical: list[PlanStep] = []
    protected: dict[str, str] = {}
    categories: Counter = Counter()

    layer_bar = tqdm(graph.layers, desc="layers", unit="layer", disable=not progress)
    for layer in layer_bar:
        layer_bar.set_postfix_str(layer.name)
        units = layer.units()
        if shuffle_units:
            units = [units[i] for i in rng.permutation(len(units))]
        remaining = layer.channels
        for unit in tqdm(units, desc=layer.name, unit="unit", leave=False, disable=not progress):
            if remaining == 1:  # a layer cannot lose its last channel
                protected[str(unit)] = "last unit of its layer (not tested)"
                categories["untested"] += 1
                continue
            with cut.trial([unit]):
                star = sigma_of(work)
            decision = test.decide(base.values, star.values[None, :], base.groups)[0]
            categories[decision.category] += 1
            step = PlanStep(unit, PROGRESSIVE, decision.category, decision.xi, p_values=decision.p_values)
            if decision.category == CRITICAL:
                step.phase = CRITICAL_RANKED
                critical.append(step)
            else:
                cut.cut(unit)
                base = star  # sigma of the network with this unit removed: no extra pass
                remaining -= 1
                removed.append(step)
        log.info("%s: %d of %d units removed", layer.name, layer.channels - remaining, layer.channels)

    # least beneficial critical units first: xi closest to zero (stable for ties)
    critical.sort(key=lambda s: -s.xi)
    plan = PruningPlan.build(
        model, graph, removed + critical, method="cswap", adapter=adapter,
        meta={
            "seed": seed,
            "samples": int(len(base.values)),
            "categories": {k: categories.get(k, 0) for k in ("neutral", "detrimental", "critical", "untested")},
            "forward_passes": sigma_of.passes,
        },
    )
    plan.protected.update(protected)
    log.info("analysis: %d forward passes in %.1f s", sigma_of.passes, time.perf_counter() - started)
    return plan
