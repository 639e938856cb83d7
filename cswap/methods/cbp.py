"""C-BP (paper app. E.3): C-SWAP without the progression.

"A version of C-SWAP that does not include the progressive pruning process, but simply prunes
the least important neurons, according to the causal criterion": every unit is cut alone on
the *unpruned* model, xi and the significance test are computed once, and the units are
ranked globally. The paper's appendix text is not in our copy, so the order is a decision:
with `order: categories` (default) the causal criterion is the one C-SWAP uses -- units the
test finds non-critical (neutral or detrimental) first, then critical ones, each by xi,
largest (most harmful to keep) first; this isolates exactly what progression adds.
`order: xi` ranks by xi alone, ignoring the test (the literal "least important by xi").
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from ..engine import make_engine
from ..interfaces import CRITICAL, RANKED, Analysis, Criterion, PlanStep, Ranking
from ..ranking import RankingOptions, normalize_layer


class CBPCriterion(Criterion):
    name = "cbp"

    class Options(RankingOptions):
        order: Literal["categories", "xi"] = "categories"

    def rank(self, analysis: Analysis, seed: int) -> Ranking:
        a, units = analysis, analysis.units
        work = copy.deepcopy(a.model).to(a.device).eval()
        sigma_of = make_engine(a.options.engine, work, a.scorer, a.task.manifold(seed), units, a.adapter.stages(work),
                               a.device)
        base = sigma_of.baseline()
        all_units = [u for layer in units.layers for u in layer.units()]
        bar = tqdm(all_units, desc="cbp", unit="unit", disable=not a.progress)
        stars = [sigma_of.trial(unit).values for unit in bar]
        decisions = a.test.decide(base.values, np.stack(stars), base.groups)
        xi = {u: d.xi for u, d in zip(all_units, decisions)}
        if self.options.normalize == "layer":
            for layer in units.layers:
                v = normalize_layer(np.array([xi[u] for u in layer.units()]))
                xi.update(zip(layer.units(), v.tolist()))
        tiebreak = dict(zip(all_units, np.random.default_rng(seed).permutation(len(all_units))))

        def key(item):
            unit, d = item
            critical = d.category == CRITICAL if self.options.order == "categories" else False
            return (critical, -xi[unit], tiebreak[unit])

        ordered = sorted(zip(all_units, decisions), key=key)
        steps = [PlanStep(u, RANKED, category=d.category, xi=d.xi, score=-xi[u], p_values=d.p_values)
                 for u, d in ordered]
        counts = Counter(d.category for d in decisions)
        return Ranking(self.name, steps, meta={
            "options": self.options.model_dump(), "forward_passes": sigma_of.passes, "engine": sigma_of.kind,
            "categories": {k: counts.get(k, 0) for k in ("neutral", "detrimental", "critical")}}, seed=seed)
