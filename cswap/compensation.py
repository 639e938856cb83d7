"""Compensated cuts: the cut the significance test judges is the removal as it will be deployed.

With recovery after removal the deployed model is not the zero-cut one, so the test should
see the cut *with* the compensation its removal will get (`pruning.intervention`):

- `mean`: each reader of the unit is shifted by what the unit contributed on average, the
  constant sum_kernel W[:, c] * mu_c, into its bias, or into the running mean of the
  BatchNorm right after it (FLAP's mean ablation). mu_c is the mean of the reader's input
  feature c over S on the unpruned model.
- `least_squares`: each reader's remaining weights get the closed-form optimal correction for
  losing the unit's input columns S (the structured Optimal-Brain-Surgeon update, as in
  Optimal Brain Compression and ZipLM): with H the inverse Gram matrix (ridge-regularised) of
  the reader's inputs on S, a constant column included for the bias,
  dW = -W[:, S] (H[S, S])^-1 H[S, :], which also makes W[:, S] zero. When a unit is removed
  for good, H is downdated (H <- H - H[:, S] (H[S, S])^-1 H[S, :]), so the next unit is
  judged on the network as it now is: Algorithm 1's sequential semantics hold.

Statistics come from the unpruned model on S (on the network Algorithm 1 has when it reaches
a layer, a unit's activations are still the unpruned ones: every layer that feeds them lies
nearer the input and is visited later), measured once per layer, when its first unit is cut.
Either way the intervention only zeroes the unit's reads and changes the kept weights, biases
and BatchNorm means of its readers: removing the cut units physically from the intervened
model gives the same network, which is how a compensated plan is replayed (`cswap.replay`).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from .errors import ConfigError
from .interfaces import Layer, Manifold, Unit, UnitGraph
from .intervention import Intervention
from .options import INTERVENTIONS
from .readers import bias_sinks, columns, features


def make_intervention(kind: str, model: nn.Module, graph: UnitGraph, original: nn.Module | None = None,
                      manifold: Manifold | None = None, ridge: float | None = None) -> Intervention:
    """The intervention `kind` over `model` (a copy of `original`, the unpruned model whose
    statistics on `manifold`, S, the compensated kinds need; `ridge`: that of the
    least-squares kind, `AnalysisOptions.ridge`)."""
    if kind == "zero":
        return Intervention(model, graph)
    if kind not in INTERVENTIONS:
        raise ConfigError(f"unknown intervention {kind!r}; use one of {', '.join(INTERVENTIONS)}")
    if original is None or manifold is None:
        raise ConfigError(f"intervention {kind} needs the unpruned model and S to measure its readers")
    if kind == "least_squares" and ridge is None:
        raise ValueError("the least-squares intervention needs its ridge (AnalysisOptions.ridge)")
    stats = ReaderStatistics(original, graph, manifold, gram=(kind == "least_squares"), ridge=ridge)
    cls = MeanIntervention if kind == "mean" else LeastSquaresIntervention
    return cls(model, graph, stats)


class ReaderStatistics:
    """Per reader, on the unpruned model over S: the mean of every input feature (`mean`) or
    the inverse Gram matrix of its input rows with a constant column (`least_squares`).
    Measured layer by layer, when a unit of the layer is first cut: one pass over S."""

    def __init__(self, original: nn.Module, graph: UnitGraph, manifold: Manifold, gram: bool, ridge: float):
        self.original, self.manifold, self.gram, self.ridge = original, manifold, gram, ridge
        self.layers = {layer.name: layer for layer in graph.layers}
        self.modules = dict(original.named_modules())
        self.sinks = bias_sinks(original, [self.modules[r] for r in self.all_readers()], manifold.batches[0][0][:1])
        self.values: dict[str, torch.Tensor] = {}  # reader name -> means, or inverse Gram (float64)

    def all_readers(self) -> list[str]:
        return list(dict.fromkeys(r for layer in self.layers.values() for r in layer.readers(input_dim_only=True)))

    def readers(self, layer: Layer) -> list[str]:
        return layer.readers(input_dim_only=True)

    def sink(self, reader: str) -> str:
        return self.sinks[self.modules[reader]]

    def of(self, layer: Layer) -> dict[str, torch.Tensor]:
        missing = [r for r in self.readers(layer) if r not in self.values]
        if missing:
            self._measure(missing)
        return {r: self.values[r] for r in self.readers(layer)}

    @torch.no_grad()
    def _measure(self, names: list[str]) -> None:
        sums: dict[str, torch.Tensor] = {}
        counts = dict.fromkeys(names, 0)

        def hook(name):
            def record(module, args, output) -> None:
                rows = self._rows(name, module, args[0])
                term = rows.T @ rows if self.gram else rows.sum(0)
                sums[name] = term if name not in sums else sums[name] + term
                counts[name] += rows.shape[0]
            return record

        handles = [self.modules[n].register_forward_hook(hook(n)) for n in names]
        try:
            self.original.eval()
            for x, _ in self.manifold:
                self.original(x.to(next(self.original.parameters()).device))
        finally:
            for h in handles:
                h.remove()
        for n in names:
            self.values[n] = self._inverse(sums[n], n) if self.gram else sums[n] / max(counts[n], 1)

    def _rows(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.gram:  # per input feature: a linear layer's last dim, a convolution's channels
            rows = x.reshape(-1, x.shape[-1]) if isinstance(module, nn.Linear) else x.transpose(0, 1).flatten(1).T
            return rows.double()
        rows = features(module, x).double()
        if self.sink(name):
            rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype, device=rows.device)], 1)
        return rows

    def _inverse(self, gram: torch.Tensor, name: str) -> torch.Tensor:
        n = gram.shape[0] - int(bool(self.sink(name)))
        reg = torch.zeros_like(gram)
        reg.diagonal()[:n] = self.ridge * gram.diagonal()[:n].mean().clamp_min(1e-12)
        return torch.linalg.inv(gram + reg)


class _Compensated(Intervention):
    """A cut that also changes the unit's readers; their state is saved per trial and given
    back exactly (copies, not inverse operations, so a restored model is bitwise the same)."""

    batchable = False

    def __init__(self, model: nn.Module, graph: UnitGraph, stats: ReaderStatistics):
        super().__init__(model, graph)
        self.stats = stats
        self.layers = {layer.name: layer for layer in graph.layers}
        self.modules = dict(model.named_modules())

    def _state(self, readers: Iterable[str]) -> list[torch.Tensor]:
        """The tensors a compensation may change: each reader's weight, bias, BatchNorm mean."""
        out = []
        for r in readers:
            m, sink = self.modules[r], self.stats.sink(r)
            out.append(m.weight)
            if sink == "bias":
                out.append(m.bias)
            elif sink:
                out.append(self.modules[sink].running_mean)
        return out

    def _reader_slices(self, units: Sequence[Unit]) -> dict[str, list[int]]:
        """reader -> its input features read from `units` (dim 1 of its weight)."""
        out: dict[str, list[int]] = {}
        for unit in units:
            for pname, dim, per_channel in self.layers[unit.layer].reads:
                if dim == 1 and per_channel[unit.channel]:
                    out.setdefault(Layer.module_of(pname), []).extend(per_channel[unit.channel])
        return out

    def _shift(self, reader: str, shift: torch.Tensor) -> None:
        sink = self.stats.sink(reader)
        if sink == "bias":
            self.modules[reader].bias.add_(shift.to(self.modules[reader].bias.dtype))
        elif sink:
            bn = self.modules[sink]
            bn.running_mean.sub_(shift.to(bn.running_mean.dtype))

    @contextlib.contextmanager
    def trial(self, units: Iterable[Unit]) -> Iterator[None]:
        """Cut `units` jointly, with their compensation, for the block; give back the readers'
        exact state afterwards."""
        units = [u for u in units if u not in self.cut_units]
        saved = [(t, t.detach().clone()) for t in self._state(self._reader_slices(units))]
        with torch.no_grad():
            self._compensate(units, permanent=False)
        for unit in units:
            super().cut(unit)
        try:
            yield
        finally:
            for unit in reversed(units):
                super().restore(unit)
            with torch.no_grad():
                for tensor, value in saved:
                    tensor.copy_(value)

    def cut(self, unit: Unit) -> None:
        self.cut_all([unit])

    def cut_all(self, units: Iterable[Unit]) -> None:
        """Cut `units` for good, compensated jointly (a removal; the statistics follow it)."""
        units = [u for u in units if u not in self.cut_units]
        with torch.no_grad():
            self._compensate(units, permanent=True)
        for unit in units:
            super().cut(unit)

    def restore(self, unit: Unit) -> None:
        raise NotImplementedError("a compensated cut made for good changes the readers; it is not undone")

    def _compensate(self, units: Sequence[Unit], permanent: bool) -> None:
        raise NotImplementedError

    def _statistics(self, units: Sequence[Unit]) -> dict[str, torch.Tensor]:
        """Per reader of the units' layers, its statistic on S (measured on first use)."""
        out: dict[str, torch.Tensor] = {}
        for layer in sorted({u.layer for u in units}):
            out.update(self.stats.of(self.layers[layer]))
        return out


class MeanIntervention(_Compensated):
    """`mean`: the readers see the unit's mean over S instead of zero (see the module docstring)."""

    def _compensate(self, units: Sequence[Unit], permanent: bool) -> None:
        means = self._statistics(units)
        for reader, feats in self._reader_slices(units).items():
            weight = self.modules[reader].weight.detach()
            idx = torch.tensor(feats, device=weight.device)
            contribution = weight.index_select(1, idx)
            contribution = contribution.flatten(2).sum(2) if weight.dim() > 2 else contribution
            self._shift(reader, contribution.double() @ means[reader][idx.cpu()].to(weight.device))


class LeastSquaresIntervention(_Compensated):
    """`least_squares`: the structured OBS update of every reader (see the module docstring)."""

    def _compensate(self, units: Sequence[Unit], permanent: bool) -> None:
        grams = self._statistics(units)
        for reader, feats in self._reader_slices(units).items():
            m, sink = self.modules[reader], self.stats.sink(reader)
            h = grams[reader]
            flat = m.weight.detach().flatten(1).double()
            if sink:  # the constant column: the bias, or the BatchNorm mean's share (0 to start)
                intercept = m.bias.detach().double() if sink == "bias" else torch.zeros(len(flat), dtype=flat.dtype)
                flat = torch.cat([flat, intercept.to(flat.device)[:, None]], 1)
            cols = columns(m, feats).to(h.device)
            step = torch.linalg.solve(h[cols][:, cols], h[cols])  # (H_SS)^-1 H_S,:
            delta = -(flat[:, cols].to(h.device) @ step).to(flat.device)
            new = flat + delta
            new[:, cols] = 0.0
            n = m.weight[0].numel()
            m.weight.copy_(new[:, :n].view_as(m.weight).to(m.weight.dtype))
            if sink:
                self._shift(reader, delta[:, n])
            if permanent:
                self.stats.values[reader] = h - h[:, cols] @ step
