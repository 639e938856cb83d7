"""Honest time before a run: what `--dry-run` says the analysis will cost, from one measured pass.

Why a model of the engine and not units x one pass: the staged engine re-runs only the stages
from a unit's first reader onwards, so a unit near the output costs a fraction of a unit near
the input; multiplying one full pass by the number of units would overstate a staged run by
the depth of the network. The probe is one pass over S (or, when the data is not there, over
the task's example input, scaled to the nominal size of S) through the chain the engine will
run, each stage timed, and the scorer timed on its output. A unit's trial is then estimated
as the stages its layer's first reader starts changing plus scoring; the analysis as the
start-up passes plus one trial per unit (an upper bound: the last unit of a layer is not
tested, and fast modes stop early).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import CSwapError
from .interfaces import Analysis

STARTUP_PASSES = 2  # the engine's baseline and its check against the forward (a trace of one sample aside)


@dataclass
class Probe:
    """One pass over S through the engine's chain: seconds per stage and for scoring."""
    samples: int  # |S|, or the nominal size when the data is absent (`measured_on_data` False)
    measured_on_data: bool
    stage_seconds: list[float]
    score_seconds: float

    @property
    def seconds(self) -> float:
        return sum(self.stage_seconds) + self.score_seconds


@dataclass
class Estimate:
    engine: str
    units: int
    layers: int
    trials: int
    probe: Probe
    trial_seconds: dict[str, tuple[float, int]] = field(default_factory=dict)  # layer: (one trial, units)

    @property
    def analysis_seconds(self) -> float:
        return STARTUP_PASSES * self.probe.seconds + sum(s * n for s, n in self.trial_seconds.values())

    def lines(self) -> list[str]:
        p = self.probe
        where = "over S" if p.measured_on_data else "over the example input scaled to the nominal |S| (no data here)"
        size = f"|S| = {p.samples} samples" if p.measured_on_data else f"|S| <= {p.samples} samples (nominal)"
        scoring = f"scoring {_duration(p.score_seconds)}" if p.measured_on_data else "scoring not timed: no targets"
        return [f"sample set {size}",
                f"engine     {self.engine}",
                f"trials     at most {self.trials} (one per unit; {self.units} units in {self.layers} layers)",
                f"probe      one pass {where}: {_duration(p.seconds)} ({scoring})",
                f"estimate   analysis about {_duration(self.analysis_seconds)} (at most; fast modes shorten it)"]


def estimate(analysis: Analysis, seed: int) -> Estimate:
    """The engine that will run, a probe pass, and the estimated analysis time."""
    a = analysis
    model = copy.deepcopy(a.model).eval()
    stages = _stages(a, model)
    batches, samples, on_data = _probe_batches(a, seed)
    probe = _probe(model, stages, a.scorer, batches, samples, on_data)
    first = _first_stages(a, model, stages) if stages is not None else {}
    trials = {layer.name: (sum(probe.stage_seconds[first.get(layer.name, 0):]) + probe.score_seconds, layer.channels)
              for layer in a.units.layers}
    return Estimate("staged" if stages is not None else "full", a.units.num_units, len(a.units.layers),
                    a.units.num_units, probe, trials)


def _stages(a: Analysis, model: nn.Module) -> list[nn.Module] | None:
    """The stage chain the engine will run, or None for full forward passes (`make_engine`'s
    choice; `auto` keeps the chain only if it reproduces the forward, checked on one input)."""
    kind = a.options.engine
    stages = None if kind == "full" else a.adapter.stages(model)
    if stages is None:
        return None
    stages = list(stages)
    x = a.example_inputs[:1]
    with torch.no_grad():
        h = x
        for stage in stages:
            h = stage(h)
        same = torch.equal(h, model(x))
    return stages if same or kind != "auto" else None


def _probe_batches(a: Analysis, seed: int) -> tuple[list, int, bool]:
    """S's batches, or the example input repeated to S's nominal size when S cannot be drawn."""
    try:
        manifold = a.task.manifold(seed)
        return list(manifold.batches), len(manifold), True
    except (CSwapError, OSError):  # no data here (a dry run on another machine): the nominal size
        nominal = _nominal_size(a)
        x = a.example_inputs[:1]
        return [(x, None)], nominal, False


def _nominal_size(a: Analysis) -> int:
    options = getattr(a.task, "options", None)
    per_class = getattr(options, "samples_per_class", None) or 1
    try:
        classes = a.task.num_classes  # a task may read it from its data
    except (CSwapError, OSError, AttributeError):
        classes = getattr(a.model, "num_classes", None) or 1
    return int(per_class) * int(classes)


@torch.no_grad()
def _probe(model, stages, scorer, batches, samples: int, on_data: bool) -> Probe:
    chain = stages if stages is not None else [model]
    seconds = [0.0] * len(chain)
    score_seconds, seen = 0.0, 0
    for x, y in batches:
        h = x
        for i, stage in enumerate(chain):
            started = time.perf_counter()
            h = stage(h)
            seconds[i] += time.perf_counter() - started
        if y is not None:
            started = time.perf_counter()
            scorer.score(h, y)
            score_seconds += time.perf_counter() - started
        seen += len(x)
    scale = 1.0 if on_data else samples / max(1, seen)
    return Probe(samples, on_data, [s * scale for s in seconds], score_seconds * scale)


def _first_stages(a: Analysis, model: nn.Module, stages: list[nn.Module]) -> dict[str, int]:
    """For each layer, the first stage holding one of its readers: where its trials start."""
    owner: dict[nn.Module, int] = {}
    for i, stage in enumerate(stages):
        for m in stage.modules():
            owner.setdefault(m, i)
    first = {}
    for layer in a.units.layers:
        readers = [model.get_submodule(p.rpartition(".")[0]) for p, _, _ in layer.reads]
        first[layer.name] = min((owner.get(r, 0) for r in readers), default=0)
    return first


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
