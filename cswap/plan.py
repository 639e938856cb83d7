"""PruningPlan: what an analysis found, as data: an ordered list of removal steps, saved as JSON.

Every method (C-SWAP and the baselines) produces one, so curves for all of them are made by
the same code. Parameter costs are counted per step on the real model's shapes
(`removal.ParamLedger`), so a ratio lands within one unit's cost of what was asked, and an
analysis that took hours is never redone to get another ratio.

A plan holds no model surgery and no replay setting: how a plan becomes a model (a target,
aligned widths, the compensated cut, recovery, removal) is `cswap.replay`'s, and `apply` is
only a door to it. What the replay must repeat of the analysis is typed here: the sample set
S (`seed`, `samples_per_class`) and the cut (`intervention`, `ridge`).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .interfaces import INCONCLUSIVE, PROGRESSIVE, Analysis, PlanStep, Ranking, UnitGraph
from .plan_check import SCHEMA, check_plan_data
from .removal import ParamLedger


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
    meta: dict = field(default_factory=dict)  # description only: counts, options, timings
    seed: int | None = None  # S was drawn with this seed ...
    samples_per_class: int | None = None  # ... and this M_k (None: the task's own)
    intervention: str = "zero"  # the cut the test judged; a replay compensates the same way
    ridge: float | None = None  # of that compensation's least squares
    scorer: dict | None = None  # {"name", "options"} of sigma, for the record
    test: dict | None = None  # {"name", "options"} of the significance test, for the record

    # ---- building -----------------------------------------------------------------
    @classmethod
    def build(cls, model: nn.Module, graph: UnitGraph, ordered: Iterable[PlanStep], *, method: str, adapter: str,
              meta: dict | None = None, protected: dict[str, str] | None = None, **typed) -> "PruningPlan":
        """Count each step's parameter cost in order; drop steps that would empty a layer.
        `protected` (units never removed, with why) is added after those dropped here;
        `typed` sets the typed fields (seed, intervention, ...)."""
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
        return cls(method=method, adapter=adapter, input_shape=tuple(graph.input_shape), params_total=ledger.total,
                   steps=steps, layers={layer.name: layer.channels for layer in graph.layers},
                   protected={**never, **(protected or {})}, skipped_layers=dict(graph.skipped), meta=meta or {},
                   **typed)

    @classmethod
    def from_ranking(cls, model: nn.Module, graph: UnitGraph, ranking: Ranking, *, adapter: str,
                     scorer: dict | None = None, test: dict | None = None) -> "PruningPlan":
        """The plan of a criterion's ranking (`Criterion.rank`, `progressive_prune`)."""
        return cls.build(model, graph, ranking.steps, method=ranking.method, adapter=adapter, meta=ranking.meta,
                         protected=ranking.protected, seed=ranking.seed, samples_per_class=ranking.samples_per_class,
                         intervention=ranking.intervention, ridge=ranking.ridge, scorer=scorer, test=test)

    @classmethod
    def from_analysis(cls, analysis: Analysis, ranking: Ranking) -> "PruningPlan":
        """The plan of a ranking made on `analysis`, recording its scorer and test."""
        from . import registry

        plan = cls.from_ranking(analysis.model, analysis.units, ranking, adapter=analysis.adapter_name,
                                scorer=registry.describe_plugin("scorers", analysis.scorer),
                                test=registry.describe_plugin("tests", analysis.test))
        if plan.samples_per_class is None:
            plan.samples_per_class = analysis.task.samples_per_class
        return plan

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

    def reachable_ratio(self) -> float:
        """The largest share of parameters this plan can remove."""
        return self.cumulative_params_removed()[-1] / max(self.params_total, 1)

    @property
    def compensated(self) -> bool:
        """Whether the plan's cuts were compensated (`intervention` mean or least_squares)."""
        return self.intervention != "zero"

    def example_inputs(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros((1, *self.input_shape), device=device, dtype=dtype)

    # ---- the door to the replay -----------------------------------------------------
    def apply(self, model: nn.Module, target=None, *, data=None, adapter=None, **target_fields) -> nn.Module:
        """The pruned copy of `model` for `target` (a `cswap.Target`, or its fields as keywords:
        `apply(model, params_ratio=0.5)`); no target removes the non-critical units only.
        Recovery repairs on calibration data by default, as `cswap prune` does: `data` is the
        analysis's task or `(inputs, targets)` (S is drawn again from it with the plan's seed),
        or `recovery="none"` skips it. Warns when the target took units the test could not judge
        (inconclusive ones), as the run summary does. See `cswap.replay.prune`."""
        from .replay import prune, target_of

        pruned = prune(self, model, target_of(target, **target_fields), data, adapter=adapter)
        gone = set(pruned.units)
        unjudged = sum(1 for s in self.steps if s.category == INCONCLUSIVE and s.unit in gone)
        if unjudged:
            warnings.warn(f"the target was met only by removing {unjudged} inconclusive unit(s) the test could not "
                          "judge; a larger S (M_k) or a wider margin lets the test judge them", stacklevel=2)
        return pruned.model

    # ---- persistence ----------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "method": self.method,
            "adapter": self.adapter,
            "seed": self.seed,
            "samples_per_class": self.samples_per_class,
            "intervention": self.intervention,
            "ridge": self.ridge,
            "scorer": self.scorer,
            "test": self.test,
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
        meta = dict(d.get("meta", {}))
        # plans written before the typed fields kept these in meta
        older = {k: meta.pop(k) for k in ("seed", "intervention", "ridge") if k in meta}
        return cls(
            method=d["method"],
            adapter=d["adapter"],
            input_shape=tuple(d["input_shape"]),
            params_total=int(d["params_total"]),
            steps=[PlanStep.from_json(s) for s in d["steps"]],
            layers=dict(d["layers"]),
            protected=dict(d.get("protected", {})),
            skipped_layers=dict(d.get("skipped_layers", {})),
            meta=meta,
            seed=d.get("seed", older.get("seed")),
            samples_per_class=d.get("samples_per_class"),
            intervention=d.get("intervention", older.get("intervention", "zero")),
            ridge=d.get("ridge", older.get("ridge")),
            scorer=d.get("scorer"),
            test=d.get("test"),
        )

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        """A plan file, its values checked first (`cswap.plan_check`): a hand-edited or received
        file is a one-line `DataError` naming the field, never a traceback in a replay."""
        from .files import read_json_object

        data = read_json_object(path)
        check_plan_data(data, str(path))
        return cls.from_json(data)
