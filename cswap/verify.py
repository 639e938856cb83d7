"""Check, before an analysis starts, that every layer's cut is its physical removal.

Why: the analysis trusts two promises per layer (docs/design.md, section 4). Cutting a unit (zeroing the
weights that read it) must give the outputs that physically removing it gives, and
`ParamLedger` must count exactly the parameters removal frees. Discovery's static rules
(LayerNorm and GroupNorm readers, grouped convolutions, model outputs) catch the known
exceptions, not every model's quirks: on timm models at random init a LeViT layer's cut
differed from its removal by 35.8 (float64), GhostNet's ledger was off by 1,514 parameters,
and MixNet's channel splits or the attention reshapes of MobileViT and CaiT broke the pruned
model, each found only hours into a run by its final self-check (or by a raw crash). Here
each layer is checked once, up front, on a probe batch, and a layer that fails is moved to
`UnitGraph.skipped` with what differed and by how much; the rest of the model is analysed.

How. A float64 copy has the probe units of a layer cut (its first, middle and last channel;
fewer when that would empty the layer), another copy has them physically removed by the
same code `PruningPlan.apply_prefix` uses (the adapter's `remove` where it has one, else
torch-pruning), and the two outputs must agree to 1e-9 of the output's scale; the removed
copy's parameter count must be what the ledger predicted, exactly.

Per layer, not jointly. One joint check of all layers, bisected on failure, would be
cheaper, but a layer's discrepancy can be hidden there by another layer's cut zeroing the
only path it takes to the output, so a joint pass proves nothing about a single layer.
Adapters with their own `remove` (ViT heads) get a fresh copy per layer: nothing but that
layer is cut, the verdict is the layer's own. With torch-pruning, whose trace takes from
milliseconds to minutes, one copy is traced once and the layers are removed one after the
other from the input side to the output side, each compared right after its removal with
the cut model holding the same cuts. Layers are ordered by when their last producer runs,
so the layers a layer feeds come after it and are not cut yet: none can zero the path its
error takes. The layers already cut (and verified) change its inputs identically in both
copies. (The one gap: a residual stream's error read between its first and last producer
could pass through a layer ordered before it; it is hidden only if all of it flows through
that layer's three cut channels.) A layer that fails is restored in the cut copy and the removed copy is rebuilt
without it (one more trace per failure).

A cut that changes nothing on the probe (dead channels) verifies nothing, but its removal
is not wrong either: such a layer stays, listed in `UnitGraph.unverified`.
`pruning.verify_units: false` skips the check (a model known to be exact, or too large to
copy); `cswap.build.units_of` reads it.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Callable

import torch
from torch import nn

from .discovery import _first_failing_module, _flatten, _reads_out_of_range
from .errors import ResourceError, one_line
from .interfaces import Layer, Unit, UnitGraph
from .intervention import Intervention
from .removal import ParamLedger, Remover, count_params

log = logging.getLogger("cswap")

RELATIVE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}


def verify_units(model: nn.Module, graph: UnitGraph, adapter, example_inputs: torch.Tensor) -> UnitGraph:
    """`graph` with every layer whose cut differs from its removal, whose removal breaks the
    model, or whose ledger is off, moved to `skipped` with the reason. `model` is not changed."""
    if not graph.layers:
        return graph
    try:
        return _verify(model, graph, adapter, example_inputs)
    except MemoryError:
        raise ResourceError(f"checking cut == removal needs two float64 copies of {type(model).__name__} and "
                            "there is not enough memory: set pruning.verify_units: false to skip the check") from None


def _verify(model: nn.Module, graph: UnitGraph, adapter, example_inputs: torch.Tensor) -> UnitGraph:
    started = time.perf_counter()
    probe, cut_model = _Probe.of(model, example_inputs)
    if probe is None:
        return graph
    log.info("checking that cut == removal for each of %d layers (two %s forward passes each)", len(graph.layers),
             probe.dtype_name)
    backend = (_FreshCopies if adapter.removes_units else _OneTrace)(model, graph, adapter, probe)
    failed, unverified = _check_layers(graph, probe, cut_model, backend)
    result = UnitGraph([layer for layer in graph.layers if layer.name not in failed], {**graph.skipped, **failed},
                       graph.input_shape, unverified={**graph.unverified, **unverified})
    log.info("cut == removal checked per layer in %.1f s (%s): %d of %d layers pass, %d left out%s",
             time.perf_counter() - started, probe.dtype_name, len(result.layers), len(graph.layers), len(failed),
             f", {len(unverified)} kept unverified (UnitGraph.unverified says why)" if unverified else "")
    for name, why in failed.items():
        log.warning("layer %s left out: %s", name, why)
    return result


class _Probe:
    """The probe batch, the dtype it runs in, and the tolerance that follows from both."""

    def __init__(self, inputs: torch.Tensor, dtype: torch.dtype, trace_inputs: torch.Tensor):
        self.inputs, self.dtype, self.trace_inputs = inputs, dtype, trace_inputs
        self.dtype_name = str(dtype).replace("torch.", "")
        self.scale = 0.0
        self.tolerance = 0.0

    @classmethod
    def of(cls, model: nn.Module, example_inputs: torch.Tensor) -> tuple["_Probe | None", nn.Module | None]:
        """The probe and a copy of the model in its dtype. The probe is the first example, or
        where that is constant (a zero placeholder before the data is in place) one seeded
        random sample of its shape: one sample, since each layer costs two forward passes.
        float64 where the model runs in it, else float32."""
        x = example_inputs[:1]
        if x.is_floating_point() and not (x.numel() > 1 and bool((x != x.flatten()[0]).any())):
            g = torch.Generator().manual_seed(0)  # not the global generator: runs stay reproducible
            x = torch.randn(x.shape, generator=g).to(device=x.device, dtype=x.dtype)
        for dtype in (torch.float64, torch.float32):
            probe = cls(x.to(dtype) if x.is_floating_point() else x, dtype,
                        example_inputs[:1].to(dtype) if x.is_floating_point() else example_inputs[:1])
            try:
                twin = probe.copy(model)
                reference = probe.outputs(twin)
            except Exception as exc:  # a model that cannot run in float64 (a hard-coded dtype, MPS)
                log.info("cut == removal check: %s forward fails (%s); trying float32", dtype, one_line(exc))
                continue
            if not all(torch.isfinite(t).all() for t in reference if t.is_floating_point()):
                log.warning("cut == removal not checked: the model's output on the probe batch is not finite")
                return None, None
            probe.scale = max((t.abs().max().item() for t in reference if t.is_floating_point() and t.numel()),
                              default=0.0)
            probe.tolerance = RELATIVE_TOLERANCE[dtype] * probe.scale
            return probe, twin
        log.warning("cut == removal not checked: the model does not run on a copy in float64 or float32")
        return None, None

    def copy(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model).to(self.dtype).eval()

    @torch.no_grad()
    def outputs(self, model: nn.Module) -> list[torch.Tensor]:
        return [t for t in _flatten(model(self.inputs)) if isinstance(t, torch.Tensor)]

    def difference(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        """Largest absolute difference between two output lists (inf if their shapes differ)."""
        if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
            return float("inf")
        return max(((x.double() - y.double()).abs().max().item() for x, y in zip(a, b) if x.numel()), default=0.0)


def _probe_units(layer: Layer) -> list[Unit]:
    """First, middle and last channel, leaving at least one channel in the layer."""
    c = layer.channels
    channels = [0, c // 2, c - 1] if c >= 4 else [0, c - 1] if c == 3 else [0] if c == 2 else []
    return [Unit(layer.name, ch) for ch in channels]


def _check_layers(graph: UnitGraph, probe: _Probe, cut_model: nn.Module,
                  backend) -> tuple[dict[str, str], dict[str, str]]:
    """Each layer from the input side: cut its probe units in `cut_model`, have `backend`
    remove them, compare; see the module docstring for why this makes every verdict the
    layer's own. A layer that fails is restored in both copies."""
    cut = Intervention(cut_model, graph)
    before = probe.outputs(cut_model)
    failed, unverified = {}, {}
    for layer in reversed(graph.layers):
        units = _probe_units(layer)
        if not units:
            unverified[layer.name] = "one channel: never removed, so never checked"
            continue
        out_of_range = _reads_out_of_range(layer, cut_model)  # an adapter's own graph may be wrong too
        if out_of_range:
            failed[layer.name] = out_of_range
            continue
        for u in units:
            cut.cut(u)
        after_cut = probe.outputs(cut_model)
        reason = backend.check(layer, units, lambda removed: _compare(probe, removed, after_cut, units))
        if reason is not None:
            failed[layer.name] = reason
            for u in units:
                cut.restore(u)
            continue
        if probe.difference(after_cut, before) <= probe.tolerance:
            unverified[layer.name] = f"cutting channels {[u.channel for u in units]} changes nothing on the probe batch"
        if backend.cumulative:
            before = after_cut
        else:
            for u in units:
                cut.restore(u)
    return failed, unverified


def _compare(probe: _Probe, removed: nn.Module, after_cut: list[torch.Tensor], units: list[Unit]) -> str | None:
    """Why the removed copy is not the cut copy on the probe batch, or None."""
    channels = [u.channel for u in units]
    try:
        after_removal = probe.outputs(removed)
    except Exception as exc:
        where = _first_failing_module(removed, probe.inputs) if probe.inputs.is_floating_point() else None
        return (f"removing channels {channels} breaks the model's forward"
                f"{f' in module {where!r}' if where else ''}: {type(exc).__name__}: {one_line(exc)}")
    diff = probe.difference(after_removal, after_cut)
    if diff > probe.tolerance:
        shapes = "" if diff != float("inf") else (f" (output shapes {[tuple(t.shape) for t in after_removal]} "
                                                  f"vs {[tuple(t.shape) for t in after_cut]})")
        return (f"cut != removal: cutting channels {channels} and removing them give outputs that differ by "
                f"{diff:.3g}{shapes} ({probe.dtype_name}; output scale {probe.scale:.3g}, tolerance "
                f"{probe.tolerance:.2g})")
    return None


class _OneTrace:
    """torch-pruning removal on one copy traced once; layers are removed one after another."""

    cumulative = True

    def __init__(self, model: nn.Module, graph: UnitGraph, adapter, probe: _Probe):
        self.model_source, self.graph, self.adapter, self.probe = model, graph, adapter, probe
        self.kept: list[Unit] = []  # probe units removed so far, of layers that passed
        self._rebuild()

    def _rebuild(self) -> None:
        self.copy = self.probe.copy(self.model_source)
        self.remover = Remover(self.copy, self.probe.trace_inputs)
        if self.kept:
            self.remover.remove(self.kept)
            self.adapter.after_pruning(self.copy)
        self.ledger = ParamLedger(self.copy, self.graph)  # shapes after the removals so far

    def check(self, layer: Layer, units: list[Unit], compare: Callable[[nn.Module], str | None]) -> str | None:
        before = count_params(self.copy)
        predicted = sum(self.ledger.remove(u) for u in units)
        try:
            self.remover.remove(units)
            self.adapter.after_pruning(self.copy)
        except Exception as exc:
            self._rebuild()
            cause = exc.__cause__ or exc  # Remover wraps torch-pruning's own error
            return (f"torch-pruning cannot remove channels {[u.channel for u in units]}: {type(cause).__name__}: "
                    f"{one_line(cause)}")
        freed = before - count_params(self.copy)
        reason = compare(self.copy) or (None if freed == predicted else _ledger_reason(units, predicted, freed))
        if reason is not None:
            self._rebuild()
            return reason
        self.kept += units
        return None


class _FreshCopies:
    """The adapter's own `remove` (units that are not torch-pruning channels), on a fresh copy
    per layer: no trace to save, so every layer is checked alone."""

    cumulative = False

    def __init__(self, model: nn.Module, graph: UnitGraph, adapter, probe: _Probe):
        self.model_source, self.graph, self.adapter, self.probe = model, graph, adapter, probe

    def check(self, layer: Layer, units: list[Unit], compare: Callable[[nn.Module], str | None]) -> str | None:
        removed = self.probe.copy(self.model_source)
        ledger = ParamLedger(removed, self.graph)
        predicted = sum(ledger.remove(u) for u in units)
        try:
            self.adapter.remove(removed, units)
            self.adapter.after_pruning(removed)
        except Exception as exc:
            return f"removing units {[u.channel for u in units]} fails: {type(exc).__name__}: {one_line(exc)}"
        reason = compare(removed)
        if reason is not None:
            return reason
        freed = ledger.total - count_params(removed)
        return None if freed == predicted else _ledger_reason(units, predicted, freed)


def _ledger_reason(units: list[Unit], predicted: int, freed: int) -> str:
    return (f"the parameter ledger is off: removing channels {[u.channel for u in units]} frees {freed:,} "
            f"parameters, ParamLedger predicted {predicted:,}")
