"""Latency targets (`pruning.latency_ratio`): replay a plan until the model is measurably faster.

Why: structured pruning is worth it only if the model gets faster, and fewer parameters or MACs
do not say how much faster on a given device: fixed per-layer costs, memory-bound operations
and widths that do not suit the kernels (see `cswap.alignment`) decide it. So a user can ask
for "1.5x faster on this machine" and the replay measures its way there.

How, in two steps (the way ZipLM and Kwon et al. prune against measured latency):

1. A lookup table (`LatencyTable.measure`), built once per model, plan, device and batch size
   and cached as JSON (in the run directory for `cswap prune`): a copy of the model with every
   prunable layer of the plan cut to 3/4, 1/2 and 1/4 of its width, beside the original. Every
   module whose weights pruning shrinks (each layer's producers and readers) is timed on its
   own recorded input, all copies in turns (one call of each per round, so machine load hits
   them alike), and its time is fitted as a + b * f, f the share of its weights left (its
   MACs' share, for a convolution or a linear layer). A prefix's latency is then predicted
   from the pruned shapes alone: the original's measured latency minus every module's b(1 - f),
   scaled by one factor fitted so the whole copies' measured latencies come out right (what
   isolated timings miss: activations, additions, caches).
2. `latency_search` bisects the plan's prefix on the prediction, then measures the chosen
   model against the original (`cswap.metrics.latencies_ms`, in turns). If the measured
   speed-up falls short, it bisects on measurements between that prefix and the whole plan;
   the answer is the shortest prefix whose *measured* speed-up reached the target.

Measurements on a shared machine are noisy (docs/results/latency.md says how much): a target
is met as measured once, not guaranteed for every later run.
"""
from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .alignment import prefix_units
from .bisection import smallest_prefix
from .files import write_text_atomic
from .backends import latencies_ms, measure, untrusted_message
from .removal import remove_units

log = logging.getLogger("cswap")

FRACTIONS = (0.75, 0.5, 0.25)  # widths the table times every layer at, besides the full width
TABLE_FILE = "latency_table.json"


def device_name(device: torch.device) -> str:
    """What the table's numbers hold for: the device, its name on CUDA, the CPU threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{torch.get_num_threads()} threads"


def timing_inputs(plan, device, batch: int) -> torch.Tensor:
    """A seeded random batch of the plan's input shape (zeros could meet shortcuts in kernels)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn((batch, *plan.input_shape), generator=g).to(device)


def removed_copy(plan, model: nn.Module, units, adapter) -> nn.Module:
    """A copy of `model` with `units` physically removed: shapes only (no compensation, no
    recovery: latency depends on the shapes)."""
    return remove_units(copy.deepcopy(model), units, adapter, plan.input_shape).eval()


def _weight_numels(model: nn.Module) -> dict[str, int]:
    return {name: m.weight.numel() for name, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor)}


def _uniform_units(plan, fraction: float, round_to: int | None) -> list:
    """Units removing (1 - fraction) of every layer's width, first in the plan's order (aligned
    to `round_to` when given), at least one unit (round_to of them) left."""
    keep_min = round_to or 1
    by_layer: dict[str, list] = {}
    for step in plan.steps:
        by_layer.setdefault(step.unit.layer, []).append(step.unit)
    units = []
    for layer, mine in by_layer.items():
        channels = int(plan.layers[layer])
        keep = max(keep_min, int(round(fraction * channels / keep_min)) * keep_min)
        units += mine[:max(0, min(len(mine), channels - keep))]
    return units


@dataclass
class LatencyTable:
    """Per module: its time fitted as a + b * (share of its weights left); the whole model's
    measured latency; the factor that maps summed module savings to whole-model savings."""

    key: dict
    total_ms: float
    modules: dict[str, dict]  # name -> {"numel": full weight size, "a": ms, "b": ms, "samples": [[f, ms], ...]}
    scale: float = 1.0
    variants: list[dict] = field(default_factory=list)  # the uniform copies: fraction, measured, predicted ms
    seconds: float = 0.0

    # ---- building -----------------------------------------------------------------
    @classmethod
    def measure(cls, plan, model: nn.Module, batch: int = 1, *, adapter, round_to: int | None = None,
                backend: str = "torch", fractions=FRACTIONS, min_seconds: float = 1.0) -> "LatencyTable":
        """Time the plan's layers at `fractions` of their widths (aligned to `round_to`) on
        the model's device; the whole copies in `backend` (`cswap.backends`), whose measured
        savings fit the scale, so the prediction is of that runtime (the modules themselves
        are timed in eager PyTorch, the only place one module runs alone)."""
        started = time.perf_counter()
        model = model.eval()
        device = next(model.parameters()).device
        x = timing_inputs(plan, device, batch)
        copies = [model] + [removed_copy(plan, model, _uniform_units(plan, f, round_to), adapter) for f in fractions]
        full = _weight_numels(model)
        shrunk = sorted({n for c in copies[1:] for n, k in _weight_numels(c).items() if k != full.get(n, k)})
        per_copy = _module_times(copies, shrunk, x, min_seconds)
        numels = [_weight_numels(c) for c in copies]
        samples = {n: [[k[n] / full[n], t[n]] for k, t in zip(numels, per_copy)] for n in shrunk}
        modules = {n: {"numel": full[n], **_fit(s), "samples": s} for n, s in samples.items()}
        whole = latencies_ms(copies, x, min_seconds=min_seconds, backend=backend)
        table = cls(_key(plan, model, batch, round_to, backend), whole[0], modules, seconds=0.0)
        raw = [table.total_ms - table.predicted_ms(c, scale=1.0) for c in copies[1:]]  # predicted savings
        real = [whole[0] - w for w in whole[1:]]
        table.scale = float(np.dot(raw, real) / np.dot(raw, raw)) if np.dot(raw, raw) > 0 else 1.0
        table.scale = min(max(table.scale, 0.0), 10.0)
        table.variants = [{"fraction": f, "measured_ms": round(w, 4), "predicted_ms": round(table.predicted_ms(c), 4)}
                          for f, c, w in zip(fractions, copies[1:], whole[1:])]
        table.seconds = round(time.perf_counter() - started, 2)
        log.info("latency table: %d modules timed at %d widths in %.1f s; whole-model scale %.2f", len(modules),
                 len(copies), table.seconds, table.scale)
        return table

    # ---- prediction -----------------------------------------------------------------
    def predicted_ms(self, pruned: nn.Module, scale: float | None = None) -> float:
        """The latency the table predicts for `pruned` (a replay of the plan), from its shapes."""
        numels = _weight_numels(pruned)
        saved = sum(m["b"] * (1.0 - numels.get(n, m["numel"]) / m["numel"]) for n, m in self.modules.items())
        return self.total_ms - (self.scale if scale is None else scale) * saved

    def matches(self, plan, model: nn.Module, batch: int, round_to: int | None = None, backend: str = "torch") -> bool:
        return self.key == _key(plan, model, batch, round_to, backend)

    # ---- persistence ----------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        return cls(**json.loads(Path(path).read_text()))


def _key(plan, model: nn.Module, batch: int, round_to: int | None, backend: str) -> dict:
    """What a cached table must agree on to be reused."""
    return {"device": device_name(next(model.parameters()).device), "backend": backend, "batch": batch,
            "torch": torch.__version__,
            "params_total": plan.params_total, "layers": dict(plan.layers), "round_to": round_to,
            "input_shape": list(plan.input_shape)}


def _fit(samples: list[list[float]]) -> dict:
    """a + b * f by least squares, b >= 0 (a module never gets slower with fewer weights)."""
    f, t = np.array(samples).T
    if np.ptp(f) <= 0:
        return {"a": float(t.mean()), "b": 0.0}
    b, a = np.polyfit(f, t, 1)
    if b < 0:
        return {"a": float(t.mean()), "b": 0.0}
    return {"a": float(a), "b": float(b)}


@torch.no_grad()
def _module_times(copies: list[nn.Module], names: list[str], x: torch.Tensor, min_seconds: float) -> list[dict]:
    """Median ms of each named module of each copy on its own recorded inputs (all its calls
    in one forward), the copies and modules timed in turns."""
    calls = [_recorded_calls(c, names, x) for c in copies]
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = [{n: [] for n in names} for _ in copies]
    started, rounds = time.perf_counter(), 0
    while rounds < 5 or (time.perf_counter() - started < min_seconds and rounds < 1000):
        rounds += 1
        for copy_calls, copy_times in zip(calls, times):
            for n in names:
                module, recorded = copy_calls[n]
                t0 = time.perf_counter()
                for args, kwargs in recorded:
                    module(*args, **kwargs)
                sync()
                copy_times[n].append((time.perf_counter() - t0) * 1e3)
    return [{n: float(np.median(t[n])) for n in names} for t in times]


def _recorded_calls(model: nn.Module, names: list[str], x: torch.Tensor) -> dict:
    """Each named module and the (args, kwargs) of its calls in one forward of `x`."""
    recorded = {n: (model.get_submodule(n), []) for n in names}

    def keeper(name):
        def hook(module, args, kwargs):
            clone = lambda v: v.detach().clone() if torch.is_tensor(v) else v  # noqa: E731
            recorded[name][1].append((tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()}))
        return hook

    hooks = [module.register_forward_pre_hook(keeper(n), with_kwargs=True) for n, (module, _) in recorded.items()]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return recorded


def table_for(plan, model: nn.Module, batch: int = 1, cache: str | Path | None = None, *, adapter,
              round_to: int | None = None, backend: str = "torch") -> LatencyTable:
    """The cached table at `cache` (a folder, or the JSON file) when it holds for this model,
    plan, device, batch and alignment; otherwise a new one, measured and saved there."""
    path = None if cache is None else (Path(cache) / TABLE_FILE if Path(cache).is_dir() else Path(cache))
    if path is not None and path.is_file():
        try:
            table = LatencyTable.load(path)
            if table.matches(plan, model, batch, round_to, backend):
                return table
        except (ValueError, TypeError, KeyError):
            log.warning("latency table %s is unreadable; measuring again", path)
    table = LatencyTable.measure(plan, model, batch, adapter=adapter, round_to=round_to, backend=backend)
    if path is not None:
        table.save(path)
    return table


@dataclass
class LatencySearch:
    """The prefix a latency target chose, and what it measured on the way."""

    steps: int
    target: float
    predicted_speedup: float  # of `steps`, by the table
    measured_speedup: float  # of `steps`
    predicted_steps: int  # the table's answer, before measuring
    measurements: list[dict]  # every prefix measured: steps, speed-up, whether its timings were trusted
    backend: str = "torch"
    trusted: bool = True  # every timing of the search within `cswap.backends.MAX_SPREAD`

    def to_json(self) -> dict:
        return asdict(self)


def latency_search(plan, model: nn.Module, ratio: float, table: LatencyTable, *, adapter,
                   round_to: int | None = None, backend: str = "torch", max_measurements: int = 7,
                   min_seconds: float = 1.0) -> LatencySearch:
    """The shortest prefix whose measured speed-up (original / pruned latency, at the table's
    batch) reaches `ratio`: found on the table's prediction, then checked and, if short,
    searched on measurements (at most `max_measurements` in all)."""
    if not ratio > 1.0:
        raise ValueError(f"latency_ratio is a speed-up and must exceed 1, got {ratio}")
    x = timing_inputs(plan, next(model.parameters()).device, table.key["batch"])

    def pruned(m: int) -> nn.Module:
        return removed_copy(plan, model, prefix_units(plan.steps, plan.layers, m, round_to), adapter)

    n = len(plan.steps)
    guess = smallest_prefix(lambda m: table.total_ms / max(table.predicted_ms(pruned(m)), 1e-9) >= ratio, 0, n)
    guess = n if guess is None else guess
    measured: dict[int, float] = {}
    trusted: dict[int, bool] = {}

    def reaches(m: int) -> bool:
        if m not in measured:
            timings = measure([model, pruned(m)], x, min_seconds=min_seconds, backend=backend)
            measured[m], trusted[m] = timings[0].median_ms / timings[1].median_ms, all(t.trusted for t in timings)
            if not trusted[m]:
                log.warning("latency target: %s", untrusted_message(timings))
        return measured[m] >= ratio

    k = guess
    if not reaches(guess):
        k = smallest_prefix(reaches, guess + 1, n, max_checks=max_measurements - 2)
        if k is None:
            msg = (f"latency_ratio {ratio:.2f} is beyond what this plan reaches on {table.key['device']} "
                   f"(measured x{measured[n]:.2f} with all {n} steps); replaying all steps")
            log.warning(msg)
            warnings.warn(msg)
            k = n
    predicted = table.total_ms / max(table.predicted_ms(pruned(k)), 1e-9)
    return LatencySearch(k, ratio, round(predicted, 4), round(measured[k], 4), guess,
                         [{"steps": m, "speedup": round(s, 4), "trusted": trusted[m]}
                          for m, s in sorted(measured.items())],
                         backend, all(trusted.values()))
