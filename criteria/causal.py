"""Criteria built on C-SWAP's interventions: C-SWAP itself, C-BP and AMP.

 - `cswap`: Algorithm 1 (`cswap.pruner.progressive_prune`) behind the Criterion interface, so
   curves compare it with the baselines through the same replay code.
 - `cbp` (paper app. E.3, "a version of C-SWAP that does not include the progressive pruning
   process, but simply prunes the least important neurons, according to the causal
   criterion"): every unit is cut alone on the *unpruned* model, xi and the significance test
   are computed once, and the units are ranked globally. The paper's appendix text is not in
   our copy, so the order is a decision: with `order: categories` (default) the causal
   criterion is the one C-SWAP uses -- units the test finds non-critical (neutral or
   detrimental) first, then critical ones, each by xi, largest (most harmful to keep) first;
   this isolates exactly what progression adds. `order: xi` ranks by xi alone, ignoring the
   test (the literal "least important by xi").
 - `amp` (paper app. E.2, "Adapted Mechanistic Pruning", after ACDC, Conmy et al. 2023): the
   same walk as C-SWAP (layers from the output, units in a seeded order), but a unit is
   removed when the damage its cut does to the *current* network is below a threshold tau,
   with no statistics: `metric: kl` is ACDC's KL(original outputs || current outputs) averaged
   over S, `metric: mean_sigma` is the drop of the mean sigma. Kept units are then ranked by
   that damage, smallest first, so the plan reaches any ratio like C-SWAP's.
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from cswap.causal import CRITICAL
from cswap.engine import make_engine
from cswap.errors import ModelError
from cswap.fast import FastOptions
from cswap.interfaces import Criterion, Manifold, Scores, ScoringFunction, Task
from cswap.plan import PROGRESSIVE, RANKED, PlanStep, PruningPlan
from cswap.pruner import progressive_prune
from cswap.units import Intervention, UnitGraph

from .base import RankingCriterion, RankingOptions, manifold_on, normalize_layer, task_scorer_and_test


class _CausalContext:
    """Common constructor of the causal criteria: scorer and test come from the caller
    (`cswap curve` passes the config's) or default to the task's, with `test` options."""

    def __init__(self, options=None, *, adapter: str = "generic", device="cpu", progress: bool = False, **context):
        self.options = options or self.Options()
        self.adapter = adapter
        self.device = torch.device(device)
        self.progress = progress
        self.context = context


class CSwapCriterion(_CausalContext, Criterion):
    """C-SWAP (Algorithm 1) as a criterion; the plan is progressive_prune's, unchanged."""

    name = "cswap"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        shuffle_units: bool = True
        engine: str = Field("auto", description="progressive_prune's engine (staged when the adapter has stages)")
        fast: FastOptions = Field(FastOptions(), description="opt-in shortcuts of cswap.fast")
        unit_batch: int | Literal["auto"] = Field(1, description="progressive_prune's unit_batch (same plan)")
        test: dict = Field(default_factory=dict, description="options of the task's significance test")

    def plan(self, model: nn.Module, units: UnitGraph, task: Task, seed: int) -> PruningPlan:
        scorer, test = task_scorer_and_test(task, self.context, self.options.test)
        stages = self.context.get("stages")  # the adapter's stage chain, when the caller has one
        return progressive_prune(
            model, units, task.manifold(seed), scorer, test, adapter=self.adapter, seed=seed,
            shuffle_units=self.options.shuffle_units, device=self.device, progress=self.progress,
            stages=stages, engine=self.options.engine, fast=self.options.fast,
            unit_batch=self.options.unit_batch)


class CBPCriterion(_CausalContext, RankingCriterion):
    """C-BP: C-SWAP's causal verdict and xi for every unit of the unpruned model, ranked once."""

    name = "cbp"

    class Options(RankingOptions):
        order: Literal["categories", "xi"] = "categories"
        engine: str = Field("auto", description="engine of the trials (staged when the adapter has stages: "
                            "bitwise the same scores)")
        test: dict = Field(default_factory=dict, description="options of the task's significance test")

    def plan(self, model: nn.Module, units: UnitGraph, task: Task, seed: int) -> PruningPlan:
        scorer, test = task_scorer_and_test(task, self.context, self.options.test)
        work = copy.deepcopy(model).to(self.device).eval()
        cut = Intervention(work, units)
        stages = self.context.get("stages")
        sigma_of = make_engine(self.options.engine, work, scorer, task.manifold(seed), units,
                               stages(work) if stages else None, self.device)
        base = sigma_of.baseline()
        all_units = [u for layer in units.layers for u in layer.units()]
        stars = []
        for unit in tqdm(all_units, desc="cbp", unit="unit", disable=not self.progress):
            with cut.trial([unit]):
                stars.append(sigma_of.trial(unit).values)
        decisions = test.decide(base.values, np.stack(stars), base.groups)
        xi = {u: d.xi for u, d in zip(all_units, decisions)}
        if self.options.normalize == "layer":
            for layer in units.layers:
                v = normalize_layer(np.array([xi[u] for u in layer.units()]))
                xi.update(zip(layer.units(), v.tolist()))
        rng = np.random.default_rng(seed)
        tiebreak = dict(zip(all_units, rng.permutation(len(all_units))))

        def key(item):
            unit, d = item
            critical = d.category == CRITICAL if self.options.order == "categories" else False
            return (critical, -xi[unit], tiebreak[unit])

        ordered = sorted(zip(all_units, decisions), key=key)
        steps = [PlanStep(u, RANKED, category=d.category, xi=d.xi, score=-xi[u], p_values=d.p_values)
                 for u, d in ordered]
        counts = Counter(d.category for d in decisions)
        return PruningPlan.build(model, units, steps, method=self.name, adapter=self.adapter, meta={
            "seed": seed, "options": self.options.model_dump(), "forward_passes": sigma_of.passes,
            "engine": type(sigma_of).__name__,
            "categories": {k: counts.get(k, 0) for k in ("neutral", "detrimental", "critical")}})


class AMPCriterion(_CausalContext, Criterion):
    """Adapted Mechanistic Pruning: progressive, removal when the damage is below tau, no test.

    Its trials run on the same engines as C-SWAP's (staged when the adapter has a stage
    chain); the metric is a mean over per-sample values, so it is a scoring function there.
    """

    name = "amp"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        metric: Literal["kl", "mean_sigma"] = "kl"
        tau: float = Field(0.01, ge=0, description="remove a unit when its cut raises the metric by less")
        shuffle_units: bool = True
        engine: str = Field("auto", description="engine of the trials (staged when the adapter has stages: "
                            "bitwise the same metric)")

    def plan(self, model: nn.Module, units: UnitGraph, task: Task, seed: int) -> PruningPlan:
        o = self.options
        work = copy.deepcopy(model).to(self.device).eval()
        cut = Intervention(work, units)
        scorer, manifold, metric = self._metric(work, manifold_on(task, seed, self.device), task)
        stages = self.context.get("stages")
        sigma_of = make_engine(o.engine, work, scorer, manifold, units, stages(work) if stages else None, self.device)
        current = metric(sigma_of.baseline())
        rng = np.random.default_rng(seed)
        removed, kept = [], []
        for layer in tqdm(units.layers, desc="amp", unit="layer", disable=not self.progress):
            order = layer.units()
            if o.shuffle_units:
                order = [order[i] for i in rng.permutation(len(order))]
            remaining = layer.channels
            for unit in order:
                if remaining == 1:
                    break
                with cut.trial([unit]):
                    after = metric(sigma_of.trial(unit))
                damage = after - current
                step = PlanStep(unit, PROGRESSIVE, score=float(damage))
                if damage < o.tau:
                    cut.cut(unit)
                    sigma_of.commit(unit)
                    current, remaining = after, remaining - 1
                    step.category = "removed"
                    removed.append(step)
                else:
                    step.phase, step.category = RANKED, "kept"
                    kept.append(step)
        kept.sort(key=lambda s: s.score)
        return PruningPlan.build(model, units, removed + kept, method=self.name, adapter=self.adapter, meta={
            "seed": seed, "options": o.model_dump(), "engine": type(sigma_of).__name__,
            "categories": {"removed": len(removed), "kept": len(kept)}})

    def _metric(self, work: nn.Module, manifold: Manifold, task: Task):
        """The per-sample scoring function, the sample set it reads (under `kl` the targets are
        the original network's log-probabilities) and metric(scores) -> float, lower is better
        (0 for the original network under `kl`)."""
        if self.options.metric == "mean_sigma":
            scorer, _ = task_scorer_and_test(task, self.context, {})
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

    name = "kl_to_reference"

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> Scores:
        log_probs = torch.log_softmax(outputs.double(), dim=1)
        kl = (targets.exp() * (targets - log_probs)).sum(dim=1)
        return Scores(kl.cpu().numpy(), np.zeros(len(kl), dtype=np.int64))
