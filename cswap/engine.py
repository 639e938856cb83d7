"""How sigma* is computed for one cut unit: the cost Algorithm 1 pays per unit.

`FullForward` runs the whole network over S for every unit (the paper's cost). `Staged`
uses the adapter's chain of stages: a cut only changes what happens from the stage holding
the unit's first reader onwards, so the inputs of every stage are cached for the current
network and only the suffix is re-run. When the pruner removes a unit, the suffix inputs
computed during that unit's trial are exactly the new network's, so the cache is updated
without an extra pass. Both run the same modules in the same order on the same tensors, so
their scores are bitwise equal (checked once at start-up; on a mismatch the staged engine
refuses and the pruner falls back to full forwards).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .errors import NumericalError
from .interfaces import Manifold, Scores, ScoringFunction
from .units import Unit, UnitGraph

log = logging.getLogger("cswap")


class FullForward:
    """sigma of the network on S by full forward passes over fixed batches."""

    def __init__(self, model: nn.Module, scorer: ScoringFunction, manifold: Manifold, device="cpu"):
        self.model, self.scorer = model, scorer
        self.batches = [(x.to(device), y.to(device) if torch.is_tensor(y) else y) for x, y in manifold]
        self.passes = 0  # forward passes over S (full or partial)

    def _scores(self, outputs: list, targets: list) -> Scores:
        values, groups = [], []
        for out, y in zip(outputs, targets):
            s = self.scorer.score(out, y)
            values.append(np.asarray(s.values, dtype=np.float64))
            groups.append(np.asarray(s.groups))
        self.passes += 1
        scores = Scores(np.concatenate(values), np.concatenate(groups))
        if not np.isfinite(scores.values).all():
            raise NumericalError(
                f"the scoring function returned {int((~np.isfinite(scores.values)).sum())} NaN/inf "
                "values; check the model weights and the input normalisation"
            )
        return scores

    @torch.no_grad()
    def baseline(self) -> Scores:
        return self._scores([self.model(x) for x, _ in self.batches], [y for _, y in self.batches])

    def trial(self, unit: Unit) -> Scores:
        """Scores with `unit` cut (the caller has cut it in the model's weights)."""
        return self.baseline()

    def commit(self, unit: Unit) -> None:
        """`unit` stays cut from now on."""


class Staged(FullForward):
    """Re-run only the stages after the cut, from cached stage inputs."""

    def __init__(self, model, scorer, manifold, stages: Sequence[nn.Module], graph: UnitGraph, device="cpu"):
        super().__init__(model, scorer, manifold, device)
        self.stages = list(stages)
        owner: dict[nn.Module, int] = {}
        for i, stage in enumerate(self.stages):
            for m in stage.modules():
                owner.setdefault(m, i)
        self.first_stage: dict[str, int] = {}
        for layer in graph.layers:
            readers = [model.get_submodule(p.rpartition(".")[0]) for p, _, _ in layer.reads]
            missing = [p for p, r in zip(layer.reads, readers) if r not in owner]
            if missing:
                raise ValueError(f"stages do not contain the readers of layer {layer.name}: {missing[0][0]}")
            self.first_stage[layer.name] = min(owner[r] for r in readers)
        self.inputs: list[list[torch.Tensor]] = []  # per batch: input of every stage
        self._pending: tuple[Unit, list[list[torch.Tensor]]] | None = None

    @torch.no_grad()
    def check_equals_forward(self) -> bool:
        x = self.batches[0][0]
        out = x
        for stage in self.stages:
            out = stage(out)
        return torch.equal(out, self.model(x))

    @torch.no_grad()
    def _run(self, start: int, keep: bool) -> tuple[list, list[list[torch.Tensor]]]:
        outputs, saved = [], []
        for b, (x, _) in enumerate(self.batches):
            h = x if start == 0 else self.inputs[b][start]
            inputs = []
            for i in range(start, len(self.stages)):
                if keep:
                    inputs.append(h)
                h = self.stages[i](h)
            outputs.append(h)
            saved.append(inputs)
        return outputs, saved

    def baseline(self) -> Scores:
        outputs, self.inputs = self._run(0, keep=True)
        return self._scores(outputs, [y for _, y in self.batches])

    def trial(self, unit: Unit) -> Scores:
        start = self.first_stage[unit.layer]
        outputs, saved = self._run(start, keep=True)
        self._pending = (unit, [s[1:] for s in saved])  # inputs of stages after `start`
        return self._scores(outputs, [y for _, y in self.batches])

    def commit(self, unit: Unit) -> None:
        if self._pending is None or self._pending[0] != unit:
            raise RuntimeError(f"commit({unit}) without its trial")
        start = self.first_stage[unit.layer]
        for b, after in enumerate(self._pending[1]):
            self.inputs[b][start + 1:] = after
        self._pending = None


def make_engine(kind: str, model, scorer, manifold, graph, stages=None, device="cpu") -> FullForward:
    """`staged` when asked or when `auto` finds a stage chain that reproduces the forward."""
    if kind not in ("auto", "staged", "full"):
        raise ValueError(f"unknown engine {kind!r}; use auto, staged or full")
    if kind == "full" or stages is None:
        if kind == "staged":
            raise ValueError("engine 'staged' needs an adapter with a stage chain")
        return FullForward(model, scorer, manifold, device)
    engine = Staged(model, scorer, manifold, stages, graph, device)
    if not engine.check_equals_forward():
        if kind == "staged":
            raise ValueError("the adapter's stages do not reproduce the model's forward exactly")
        log.warning("stage chain differs from the forward; using full forward passes")
        return FullForward(model, scorer, manifold, device)
    return engine
