"""AMP, "Adapted Mechanistic Pruning" (paper app. E.2, after ACDC, Conmy et al. 2023).

The same walk as C-SWAP (layers from the output, units in a seeded order), but a unit is
removed when the damage its cut does to the *current* network is below a threshold tau,
with no statistics: `metric: kl` is ACDC's KL(original outputs || current outputs) averaged
over S, `metric: mean_sigma` is the drop of the mean sigma. Kept units are then ranked by
that damage, smallest first, so the plan reaches any ratio like C-SWAP's. Its trials run on
the same engines as C-SWAP's; the metric is a mean over per-sample values, so it is a scoring
function there.
"""
from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from ..compensation import make_intervention
from ..engine import make_engine
from ..errors import ModelError
from ..interfaces import PROGRESSIVE, RANKED, Analysis, Criterion, Manifold, PlanStep, Ranking, Scores, ScoringFunction
from ..tail_order import kept_tail


class AMPCriterion(Criterion):
    name = "amp"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        metric: Literal["kl", "mean_sigma"] = "kl"
        tau: float = Field(0.01, ge=0, description="remove a unit when its cut raises the metric by less")

    def rank(self, analysis: Analysis, seed: int) -> Ranking:
        a = analysis
        work, o = copy.deepcopy(a.model).to(a.device).eval(), a.options
        sample_set = a.task.manifold(seed).to(a.device)
        scorer, manifold, metric = self._metric(work, sample_set, a.scorer)
        # a compensated cut (pruning.intervention) is judged as C-SWAP's is, its statistics from S
        intervention = make_intervention(o.intervention, work, a.units, a.model, sample_set, o.ridge)
        sigma_of = make_engine(o.engine, work, scorer, manifold, a.units, a.adapter.stages(work), a.device,
                               intervention)
        current = metric(sigma_of.baseline())
        rng = np.random.default_rng(seed)
        removed, kept = [], []
        for layer in tqdm(a.units.layers, desc="amp", unit="layer", disable=not a.progress):
            order = layer.units()
            if a.options.shuffle_units:
                order = [order[i] for i in rng.permutation(len(order))]
            remaining = layer.channels
            for unit in order:
                if remaining == 1:
                    break
                after = metric(sigma_of.trial(unit))
                damage = after - current
                step = PlanStep(unit, PROGRESSIVE, score=float(damage))
                if damage < self.options.tau:
                    sigma_of.commit(unit)
                    current, remaining = after, remaining - 1
                    step.category = "removed"
                    removed.append(step)
                else:
                    step.phase, step.category = RANKED, "kept"
                    kept.append(step)
        kept, tail_meta = kept_tail(o, a.model, a.units, removed, kept, lambda s: s.score)
        meta = {"options": self.options.model_dump(), "engine": sigma_of.kind,
                "categories": {"removed": len(removed), "kept": len(kept)}, **tail_meta}
        # the replay compensates the same way, with the statistics of the same S (cswap.replay)
        return Ranking(self.name, removed + kept, meta=meta, seed=seed, intervention=o.intervention, ridge=o.ridge)

    def _metric(self, work: nn.Module, manifold: Manifold, scorer: ScoringFunction):
        """The per-sample scoring function, the sample set it reads (under `kl` the targets are
        the original network's log-probabilities) and metric(scores) -> float, lower is better
        (0 for the original network under `kl`)."""
        if self.options.metric == "mean_sigma":
            return scorer, manifold, lambda scores: -float(scores.values.mean())
        with torch.no_grad():
            outs = [work(x) for x, _ in manifold]
        if any(not torch.is_tensor(o) or o.dim() != 2 for o in outs):
            raise ModelError("amp metric 'kl' needs class logits (N, C); use metric: mean_sigma")
        reference = Manifold([(x, torch.log_softmax(o.double(), dim=1)) for (x, _), o in zip(manifold, outs)],
                             manifold.class_counts)
        return _KLToReference(), reference, lambda scores: float(torch.from_numpy(scores.values).mean())


class _KLToReference(ScoringFunction):
    """KL(original || network) per sample; the targets are the original's log-probabilities."""

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> Scores:
        log_probs = torch.log_softmax(outputs.double(), dim=1)
        kl = (targets.exp() * (targets - log_probs)).sum(dim=1)
        return Scores(kl.cpu().numpy(), np.zeros(len(kl), dtype=np.int64))
