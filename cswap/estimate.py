"""Honest time before a run: what `--dry-run` says the analysis will cost, from one measured pass.

Why a model of the engine and not units x one pass: the staged engine re-runs only the stages
from a unit's first reader onwards, so a unit near the output costs a fraction of a unit near
the input; multiplying one full pass by the number of units would overstate a staged run by
the depth of the network. The probe is one batch of S (or, when the data is not there, the
task's example input) through the chain the engine will run, each stage timed, and the scorer
timed on its output, scaled to |S|, so the answer comes in seconds; the units themselves are
traced on a shrunk input (`shrunk_inputs`) where the model allows. A unit's trial is then estimated
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

from .engine import first_stage, stage_chain, stage_owners
from .errors import CSwapError
from .interfaces import Analysis

STARTUP_PASSES = 2  # the engine's baseline and its check against the forward (a trace of one sample aside)


@dataclass
class Probe:
    """One pass over S through the engine's chain, scaled from the probe: seconds per stage and
    for scoring."""
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
        where = "over S (a batch, scaled)" if p.measured_on_data else \
            "over the example input scaled to the nominal |S| (no data here)"
        size = f"|S| = {p.samples} samples" if p.measured_on_data else f"|S| <= {p.samples} samples (nominal)"
        scoring = f"scoring {_duration(p.score_seconds)}" if p.measured_on_data else "scoring not timed: no targets"
        return [f"sample set {size}",
                f"engine     {self.engine}",
                f"trials     at most {self.trials} (one per unit; {self.units} units in {self.layers} layers)",
                f"probe      one pass {where}: {_duration(p.seconds)} ({scoring})",
                f"estimate   analysis about {_duration(self.analysis_seconds)} (at most; fast modes shorten it)"]


def estimate(analysis: Analysis, seed: int, traced: torch.Tensor | None = None) -> Estimate:
    """The engine that will run, a probe pass, and the estimated analysis time. `traced` is a
    smaller input the units were traced on (`shrunk_inputs`): the engine's stage check runs on
    it; the timed pass runs at the real size (a time per pixel measured small would count each
    operation's fixed cost hundreds of times over)."""
    a = analysis
    model = copy.deepcopy(a.model).eval()
    small = traced if traced is not None else a.example_inputs[:1]
    stages = stage_chain(a.options.engine, a.adapter.stages(model), model, small)  # the engine's choice
    batches, samples, on_data = _probe_batches(a, seed)
    probe = _probe(model, stages, a.scorer, batches, samples, on_data)
    owners = stage_owners(stages) if stages is not None else {}
    trials = {layer.name: (sum(probe.stage_seconds[first_stage(layer, model, owners):]) + probe.score_seconds,
                           layer.channels) for layer in a.units.layers}
    kind = "full" if stages is None else "delta" if a.options.engine == "delta" else "staged"
    return Estimate(kind, a.units.num_units, len(a.units.layers), a.units.num_units, probe, trials)


def _probe_batches(a: Analysis, seed: int) -> tuple[list, int, bool]:
    """S's first batch and |S|, or the example input and S's nominal size when S cannot be drawn."""
    try:
        manifold = a.task.manifold(seed)
        return list(manifold.batches[:1]), len(manifold), True
    except (CSwapError, OSError):  # no data here (a dry run on another machine): the nominal size
        return [(a.example_inputs[:1], None)], _nominal_size(a), False


def _nominal_size(a: Analysis) -> int:
    """|S| the task would draw: its M_k times its classes (1 where it declares none)."""
    try:
        classes = a.task.num_classes  # a task may read it from its data
    except (CSwapError, OSError):
        classes = None
    return int(a.task.samples_per_class or 1) * int(classes or 1)


@torch.no_grad()
def _probe(model, stages, scorer, batches, samples: int, on_data: bool) -> Probe:
    """Time the batches through the chain, scaled to `samples`."""
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
    scale = samples / max(1, seen)
    return Probe(samples, on_data, [s * scale for s in seconds], score_seconds * scale)


def shrunk_inputs(model: nn.Module, x: torch.Tensor, max_side: int) -> torch.Tensor:
    """`x` (images N, C, H, W) resized to at most `max_side` pixels a side, in multiples of 32
    (what strided backbones need), when the model runs on it; else `x` unchanged. Why: tracing
    and checking units at 2048x1024 takes minutes on a CPU, and a CNN's units, its stages and
    the share of time each stage takes do not depend on the image size."""
    if x.dim() != 4 or max(x.shape[-2:]) <= max_side:
        return x
    scale = max_side / max(x.shape[-2:])
    size = [max(32, int(s * scale) // 32 * 32) for s in x.shape[-2:]]
    small = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    try:
        with torch.no_grad():
            model.eval()(small[:1])
    except Exception:  # noqa: BLE001 - a model with a fixed input size: trace at the real one
        return x
    return small


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
