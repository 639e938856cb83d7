"""PruningPlan: an ordered list of removal steps, saved as JSON and replayed physically.

Every method (C-SWAP and the baselines) produces one, so curves for all of them are made by
the same code: a prefix of the steps is removed from a fresh copy of the model. Parameter
costs are counted per step on the real model's shapes (`removal.ParamLedger`), so a ratio
lands within one unit's cost of what was asked, and an analysis that took hours is never
redone to get another ratio.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .alignment import aligned_units, smallest_prefix
from .errors import ModelError
from .interfaces import PROGRESSIVE, RANKED, PlanStep, Ranking, Unit, UnitGraph
from .options import RecoveryOptions
from .removal import ParamLedger, count_params, prune_units
from .replay import needs_cut_model, replay

SCHEMA = "cswap.plan/1"


@dataclass
class PruningPlan:
    method: str
    adapter: str
    input_shape: tuple[int, ...]
    params_total: int
    steps: list[PlanStep]
    layers: dict[str, int]  # prunable layer -> channels, in analysis order
    protected: dict[str, str] = field(default_factory=dict)  # unit -> why it is never removed
    skipped_layers: dict[str, str] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    # replay option, never saved: keep pruned widths a multiple of this (cswap.alignment; `aligned`)
    round_to: int | None = None

    # ---- building -----------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: nn.Module,
        graph: UnitGraph,
        ordered: Iterable[PlanStep],
        *,
        method: str,
        adapter: str,
        meta: dict | None = None,
        protected: dict[str, str] | None = None,
    ) -> "PruningPlan":
        """Count each step's parameter cost in order; drop steps that would empty a layer.
        `protected` (units never removed, with why) is added after those dropped here."""
        ledger = ParamLedger(model, graph)
        remaining = {layer.name: layer.channels for layer in graph.layers}
        steps, never = [], {}
        for step in ordered:
            if remaining[step.unit.layer] <= 1:
                never[str(step.unit)] = "last unit of its layer"
                continue
            remaining[step.unit.layer] -= 1
            step.params_freed = ledger.remove(step.unit)
            steps.append(step)
        return cls(
            method=method,
            adapter=adapter,
            input_shape=tuple(graph.input_shape),
            params_total=ledger.total,
            steps=steps,
            layers={layer.name: layer.channels for layer in graph.layers},
            protected={**never, **(protected or {})},
            skipped_layers=dict(graph.skipped),
            meta=meta or {},
        )

    @classmethod
    def from_ranking(cls, model: nn.Module, graph: UnitGraph, ranking: Ranking, *, adapter: str) -> "PruningPlan":
        """The plan of a criterion's ranking (`Criterion.rank`, `progressive_prune`)."""
        return cls.build(model, graph, ranking.steps, method=ranking.method, adapter=adapter, meta=ranking.meta,
                         protected=ranking.protected)

    # ---- queries --------------------------------------------------------------------
    @property
    def num_noncritical(self) -> int:
        return sum(1 for s in self.steps if s.phase == PROGRESSIVE)

    def category_counts(self) -> dict[str, int]:
        """Units per category as the analysis decided them (empty for a baseline ranking)."""
        return dict(self.meta.get("categories", {}))

    def cumulative_params_removed(self) -> list[int]:
        """Parameters removed after each prefix length 0..len(steps)."""
        out, total = [0], 0
        for s in self.steps:
            total += s.params_freed
            out.append(total)
        return out

    def prefix_for(self, params_ratio: float | None = None) -> int:
        """Number of leading steps to replay: the fewest reaching `params_ratio` of the
        parameters, or the non-critical steps when no ratio is given."""
        if params_ratio is None:
            if self.num_noncritical == 0 and self.steps and self.steps[0].phase == RANKED:
                raise ValueError(f"the {self.method} plan is a ranking: give params_ratio or flops_ratio")
            return self.num_noncritical
        if not 0.0 <= params_ratio <= 1.0:
            raise ValueError(f"params_ratio must be in [0, 1], got {params_ratio}")
        if self.round_to:
            raise ValueError("an aligned replay (round_to) counts parameters on the model: use prefix(model, ratio)")
        goal = params_ratio * self.params_total
        for k, removed in enumerate(self.cumulative_params_removed()):
            if removed >= goal - 1e-9:
                return k
        msg = (f"params_ratio {params_ratio:.3f} is beyond what this plan can remove "
               f"({self.reachable_ratio():.3f}); replaying all {len(self.steps)} steps")
        logging.getLogger("cswap").warning(msg)
        warnings.warn(msg)
        return len(self.steps)

    def reachable_ratio(self) -> float:
        """The largest share of parameters this plan can remove."""
        return self.cumulative_params_removed()[-1] / max(self.params_total, 1)

    def units(self, k: int | None = None) -> list[Unit]:
        """The units a replay of the first `k` steps removes (all steps: None); with `round_to`,
        each layer's count rounded to an aligned width (`cswap.alignment`)."""
        k = len(self.steps) if k is None else k
        if self.round_to:
            return aligned_units(self.steps, self.layers, k, self.round_to)
        return [s.unit for s in self.steps[:k]]

    def aligned(self, round_to: int | None) -> "PruningPlan":
        """This plan, replayed so every pruned layer's width is a multiple of `round_to` (None:
        as it is). The steps and plan.json are unchanged: alignment is a property of the replay."""
        return dataclasses.replace(self, round_to=round_to)

    # ---- replay ---------------------------------------------------------------------
    def example_inputs(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros((1, *self.input_shape), device=device, dtype=dtype)

    def apply(
        self,
        model: nn.Module,
        params_ratio: float | None = None,
        *,
        flops_ratio: float | None = None,
        latency_ratio: float | None = None,
        latency=None,
        adapter=None,
        inplace: bool = False,
        sample_set=None,
        calibration=None,
        recovery=None,
    ) -> nn.Module:
        """Physically remove a prefix of the steps from a copy of `model`.

        No ratio replays the non-critical steps only (the paper's C-SWAP without a target).
        `flops_ratio` searches the shortest prefix removing at least that share of MACs.
        A plan with compensated cuts needs `sample_set` (the analysis's S, `task.manifold(seed)`);
        `recovery` (a `RecoveryOptions` or its string, e.g. "least_squares+bn") repairs the
        pruned model on `calibration` (default: S) (see `cswap.replay`).
        """
        if params_ratio is not None and flops_ratio is not None:
            raise ValueError("give params_ratio or flops_ratio, not both")
        if count_params(model) != self.params_total:
            raise ModelError(
                f"the plan was made for a model with {self.params_total} parameters, "
                f"this one has {count_params(model)}"
            )
        k = self.prefix(model, params_ratio, flops_ratio, latency_ratio, latency=latency)
        return self.apply_prefix(model, k, adapter=adapter, inplace=inplace,
                                 sample_set=sample_set, calibration=calibration, recovery=recovery)

    def prefix(self, model: nn.Module, params_ratio: float | None = None, flops_ratio: float | None = None,
               latency_ratio: float | None = None, *, latency=None) -> int:
        """Steps to replay for a parameter, MAC or latency target (none: the non-critical steps).
        `latency_ratio` is a speed-up (1.5: 1.5x faster) measured on the model's device, with the
        `cswap.latency.LatencyTable` `latency` (default: one measured now, at batch 1)."""
        if sum(r is not None for r in (params_ratio, flops_ratio, latency_ratio)) > 1:
            raise ValueError("give one of params_ratio, flops_ratio, latency_ratio")
        if latency_ratio is not None:
            from .latency import latency_prefix

            return latency_prefix(self, model, latency_ratio, latency)
        if flops_ratio is not None:
            return self._flops_prefix(model, flops_ratio)
        if self.round_to and params_ratio is not None:
            return self._aligned_params_prefix(model, params_ratio)
        return self.prefix_for(params_ratio)

    def _aligned_params_prefix(self, model: nn.Module, params_ratio: float) -> int:
        """The fewest steps whose aligned replay removes `params_ratio` of the parameters,
        counted on the pruned model (the aligned set is not a prefix of the ledger's steps)."""
        if not 0.0 <= params_ratio <= 1.0:
            raise ValueError(f"params_ratio must be in [0, 1], got {params_ratio}")
        goal, adapter = params_ratio * self.params_total, self._adapter()
        k = smallest_prefix(len(self.steps), lambda m: self.params_total - count_params(
            self.remove(copy.deepcopy(model), m, adapter)) >= goal - 1e-9)  # shapes only: no compensation needed
        if k is None:
            warnings.warn(f"params_ratio {params_ratio:.3f} is beyond what the aligned replay of this plan can remove; "
                          "replaying all steps")
            return len(self.steps)
        return k

    def apply_prefix(self, model: nn.Module, k: int, *, adapter=None, inplace: bool = False, sample_set=None,
                     calibration=None, recovery=None) -> nn.Module:
        """The first `k` steps removed from `model` (a copy unless `inplace`); see `apply`."""
        adapter = adapter or self._adapter()
        recovery = RecoveryOptions.model_validate(recovery) if recovery is not None else None
        if needs_cut_model(self, recovery):
            if inplace:
                raise ValueError("a compensated or recovered replay builds a new model; use remove() for the shape alone")
            return replay(self, model, k, adapter=adapter, sample_set=sample_set, calibration=calibration,
                          recovery=recovery, ridge=self.meta.get("ridge", 1e-3)).pruned
        return self.remove(model if inplace else copy.deepcopy(model), k, adapter)

    @property
    def compensated(self) -> bool:
        """Whether the plan's cuts were compensated (`intervention` mean or least_squares)."""
        return self.meta.get("intervention", "zero") != "zero"

    def remove(self, model: nn.Module, k: int, adapter) -> nn.Module:
        """Physically remove the first `k` steps' units from `model`, in place."""
        if adapter.removes_units:  # units that are not torch-pruning channels (ViT heads)
            adapter.remove(model, self.units(k))
        else:
            p = next(model.parameters())
            prune_units(model, self.example_inputs(p.device, p.dtype), self.units(k))
        adapter.after_pruning(model)
        return model

    def _adapter(self):
        from . import registry

        return registry.create("adapters", self.adapter)

    def _flops_prefix(self, model: nn.Module, flops_ratio: float) -> int:
        from .metrics import count_macs

        adapter = self._adapter()
        if not 0.0 <= flops_ratio <= 1.0:
            raise ValueError(f"flops_ratio must be in [0, 1], got {flops_ratio}")
        x = self.example_inputs(next(model.parameters()).device)
        goal = (1.0 - flops_ratio) * count_macs(model, x)
        lo, hi = 0, len(self.steps)  # removing more steps never adds MACs: bisect
        if count_macs(self.remove(copy.deepcopy(model), hi, adapter), x) > goal:
            warnings.warn(f"flops_ratio {flops_ratio:.3f} is beyond what this plan can remove; replaying all steps")
            return hi
        while lo < hi:
            mid = (lo + hi) // 2
            if count_macs(self.remove(copy.deepcopy(model), mid, adapter), x) <= goal:
                hi = mid
            else:
                lo = mid + 1
        return lo

    # ---- persistence ----------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "method": self.method,
            "adapter": self.adapter,
            "input_shape": list(self.input_shape),
            "params_total": self.params_total,
            "layers": self.layers,
            "skipped_layers": self.skipped_layers,
            "protected": self.protected,
            "category_counts": self.category_counts(),
            "num_noncritical": self.num_noncritical,
            "steps": [s.to_json() for s in self.steps],
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> Path:
        from .files import write_text_atomic

        return write_text_atomic(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def from_json(cls, d: dict) -> "PruningPlan":
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a C-SWAP plan (schema {d.get('schema')!r}, expected {SCHEMA!r})")
        return cls(
            method=d["method"],
            adapter=d["adapter"],
            input_shape=tuple(d["input_shape"]),
            params_total=int(d["params_total"]),
            steps=[PlanStep.from_json(s) for s in d["steps"]],
            layers=dict(d["layers"]),
            protected=dict(d.get("protected", {})),
            skipped_layers=dict(d.get("skipped_layers", {})),
            meta=dict(d.get("meta", {})),
        )

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        return cls.from_json(json.loads(Path(path).read_text()))
