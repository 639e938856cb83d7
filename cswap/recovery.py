"""Recovery after removal, in closed form: no gradients, no labels, no training.

After units are removed, the layers that read them (their *readers*) see fewer inputs. Three
repairs, each computed from unlabeled calibration data (never the evaluation data):

- `bias`: each removed input's mean contribution is folded into its reader's bias, or into
  the running mean of the BatchNorm right after the reader when it has no bias (FLAP's mean
  ablation: the reader sees the removed input's mean instead of zero);
- `bn`: the running statistics of every BatchNorm whose input changed are re-estimated
  (adaptive BN, EagleEye);
- `least_squares`: the kept input weights and the bias of every reader are re-fitted so its
  output on the calibration data matches the unpruned model's at the same place (ThiNet;
  Kwon et al. 2022), ridge-regularised normal equations accumulated batch by batch (memory
  bounded by the reader's Gram matrix); convolutions through their unfolded input patches.
  A system too small for its columns (fewer than `heldout.ROWS_PER_COLUMN` rows per column)
  takes its ridge from held-out calibration samples and is left unrepaired where no re-fit
  predicts them better than the unrepaired weights by more than the folds' noise
  (`cswap.heldout`); a well-determined one
  is solved exactly as before. Each re-fit's calibration fit (and held-out fit, where
  measured) is in the report.

Methods compose with "+", applied in the order written (`least_squares+bn`). Readers are
visited in network order, each seeing the inputs that the already-repaired layers before it
produce (`sequential`); `local` takes every reader's inputs from the model before any repair.

All repairs work on the *cut* model (the unpruned architecture with the removed units' reads
zeroed, which equals the pruned model: cut == removal, checked for every layer). Its input
and output channels keep the unpruned numbering, so no index bookkeeping is needed, and the
caller then removes the cut units physically (`PruningPlan.apply_prefix`), which carries the
repaired weights, biases and statistics over to the smaller model exactly.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .heldout import FOLDS, NormalEquations, choose_ridge, solve_towards, well_determined
from .hooks import trace_calls
from .interfaces import Unit, UnitGraph
from .readers import (BATCHNORM, Reader, columns, features, features_of_channels, find_readers, module_io, shift_output,
                      targets, unsupported)

log = logging.getLogger("cswap")

SAMPLES_PER_CHUNK = 32  # e.g. 32 x 28 x 28 patch rows x 577 columns in float64: 115 MB at most


@dataclass
class RecoveryReport:
    methods: tuple[str, ...]
    readers: int = 0
    batchnorms: int = 0
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)  # reader -> why a repair was left out
    fits: dict[str, dict] = field(default_factory=dict)  # least-squares reader -> `LayerFit.to_json()`

    def to_json(self) -> dict:
        out = {"methods": "+".join(self.methods) or "none", "readers": self.readers, "batchnorms": self.batchnorms,
               "seconds": round(self.seconds, 3), "skipped": self.skipped}
        if self.fits:
            out["fits"] = self.fits
        if self.held_out()[0]:
            out["held_out"] = self.held_out_summary()
        return out

    def held_out(self) -> tuple[int, int]:
        """(re-fits whose ridge came from held-out data, readers left unrepaired for it)."""
        measured = [f for f in self.fits.values() if "held_out_r2" in f]
        return len(measured), sum(1 for f in measured if f["ridge"] is None)

    def held_out_summary(self) -> dict:
        """The under-determined re-fits together, for the run summary: how many, how many were
        left unrepaired, and their mean R^2 on the calibration data beside the held-out
        samples' (and the unrepaired weights' held-out R^2): a calibration fit far above the
        held-out one is a repair that fitted S, not the model."""
        measured = [f for f in self.fits.values() if "held_out_r2" in f]
        mean = lambda key: round(sum(f[key] for f in measured) / len(measured), 6)  # noqa: E731
        return {"refits": len(measured), "left_unrepaired": self.held_out()[1],
                "calibration_r2": mean("calibration_r2"), "held_out_r2": mean("held_out_r2"),
                "unrepaired_held_out_r2": mean("unrepaired_held_out_r2")}


@dataclass
class LayerFit:
    """One reader's least-squares re-fit: the size of its system, the ridge used (None: left
    unrepaired), and how much of the unpruned output's variance it explains on the
    calibration data and, for an under-determined system, on held-out samples."""

    rows: int
    columns: int
    ridge: float | None
    calibration_r2: float
    held_out_r2: float | None = None
    unrepaired_held_out_r2: float | None = None

    def to_json(self) -> dict:
        out = {"rows": self.rows, "columns": self.columns, "ridge": self.ridge,
               "calibration_r2": round(self.calibration_r2, 6)}
        if self.held_out_r2 is not None:
            out.update(held_out_r2=round(self.held_out_r2, 6),
                       unrepaired_held_out_r2=round(self.unrepaired_held_out_r2, 6))
        return out


def recover(cut: nn.Module, original: nn.Module, graph: UnitGraph, units: Sequence[Unit],
            calibration: Sequence[torch.Tensor], methods: Sequence[str], *, sequential: bool = True,
            ridge: float, progress: bool = False) -> RecoveryReport:
    """Repair `cut` (a copy of `original` with `units` cut) in place with `methods`, on the
    calibration inputs (batches of model inputs). `original` is never changed."""
    started = time.perf_counter()
    report = RecoveryReport(tuple(methods))
    readers = find_readers(cut, graph, units, calibration[0][:1])
    report.readers = len(readers)
    cut.eval()
    # a convolution's input patches are (samples x positions) rows: small chunks of samples
    # bound the memory of every solve (the Gram matrix itself is columns x columns)
    chunks = [part for x in calibration for part in x.split(SAMPLES_PER_CHUNK)]
    for method in methods:
        if method == "bn":
            report.batchnorms = reestimate_batchnorm(cut, original, calibration)
            continue
        snapshot = None if sequential else _InputSnapshot(cut, readers, chunks)
        bar = tqdm(readers, desc=f"recovery ({method})", unit="layer", disable=not progress)
        for reader in bar:
            if method == "bias":
                why = fold_means(reader, cut, original, chunks, snapshot=snapshot)
            else:
                why, fit = refit_least_squares(reader, cut, original, chunks, snapshot=snapshot, ridge=ridge)
                if fit is not None:
                    report.fits[reader.name] = fit.to_json()
            if why:
                report.skipped[f"{method}:{reader.name}"] = why
    report.seconds = time.perf_counter() - started
    log.info("recovery %s: %d readers, %d BatchNorms in %.1f s", "+".join(methods) or "none", report.readers,
             report.batchnorms, report.seconds)
    return report


class _InputSnapshot:
    """Every reader's inputs on the calibration data, taken once before any repair (`local`)."""

    def __init__(self, model: nn.Module, readers: list[Reader], calibration: Sequence[torch.Tensor]):
        self.inputs = {r.name: [module_io(model, r.module, x)[0] for x in calibration] for r in readers}

    def of(self, reader: Reader, b: int) -> torch.Tensor:
        return self.inputs[reader.name][b]


def _reader_inputs(reader: Reader, cut: nn.Module, x: torch.Tensor, b: int, snapshot) -> torch.Tensor:
    return snapshot.of(reader, b) if snapshot is not None else module_io(cut, reader.module, x)[0]


def fold_means(reader: Reader, cut: nn.Module, original: nn.Module, calibration, *, snapshot=None) -> str:
    """`bias`: add what the removed inputs contributed on average to the reader's output."""
    if why := unsupported(reader) or ("" if reader.bias_sink else "no bias and no BatchNorm after it"):
        return why
    m, gone = reader.module, torch.tensor(reader.removed)
    total, count = None, 0
    for b, x in enumerate(calibration):
        rows = features_of_channels(m, _reader_inputs(reader, cut, x, b, snapshot), gone)
        total = rows.sum(0, dtype=torch.float64) if total is None else total + rows.sum(0, dtype=torch.float64)
        count += rows.shape[0]
    weight = dict(original.named_modules())[reader.name].weight.detach().double()
    shift = weight.flatten(1)[:, columns(m, reader.removed)] @ (total / count)
    shift_output(cut, reader, shift.to(m.weight.dtype))
    return ""


def refit_least_squares(reader: Reader, cut: nn.Module, original: nn.Module, calibration, *, snapshot=None,
                        ridge: float) -> tuple[str, LayerFit | None]:
    """`least_squares`: kept weights and bias so the reader's output matches the original's.
    Returns why the reader was left unrepaired ("" if it was not) and the fit."""
    if why := unsupported(reader):
        return why, None
    m = reader.module
    cols = columns(m, reader.kept)
    intercept = bool(reader.bias_sink)
    eq = _normal_equations(reader, cut, original, calibration, snapshot, cols, intercept)
    size = (eq.total.rows, eq.total.gram.shape[0])
    if eq.folds == 0:  # well determined: the plain ridge, as always
        solution = solve_towards(eq.total.gram, eq.total.cross, ridge, None, intercept)
        fit = LayerFit(*size, ridge, eq.r2(solution))
    elif eq.folds == 1:
        return "too few calibration samples for its columns, and too few to hold out: left unrepaired", \
            LayerFit(*size, None, eq.r2(_unrepaired(cut, reader, cols, intercept)))
    else:
        prior = _unrepaired(cut, reader, cols, intercept)
        choice = choose_ridge(eq, prior, ridge, intercept)
        solution = prior if choice.ridge is None else solve_towards(eq.total.gram, eq.total.cross, choice.ridge,
                                                                     prior, intercept)
        fit = LayerFit(*size, choice.ridge, eq.r2(solution), choice.held_out_r2, choice.unrepaired_held_out_r2)
        if choice.ridge is None:
            return "no re-fit predicts held-out calibration samples better than no recovery: left unrepaired", fit
    _set_fit(cut, reader, cols, solution, intercept)
    return "", fit


def _normal_equations(reader: Reader, cut: nn.Module, original: nn.Module, calibration, snapshot,
                      cols: torch.Tensor, intercept: bool) -> NormalEquations:
    """The reader's normal equations on the calibration chunks; held out by fold of samples
    (`folds` > 1) only when the system has too few rows for its columns (`heldout`)."""
    m = reader.module
    target_module = dict(original.named_modules())[reader.name]
    samples = sum(len(x) for x in calibration)
    eq = None
    for b, x in enumerate(calibration):
        feats = features(m, _reader_inputs(reader, cut, x, b, snapshot))[:, cols.to(x.device)].double()
        if intercept:
            feats = torch.cat([feats, torch.ones(len(feats), 1, dtype=feats.dtype, device=feats.device)], 1)
        y = targets(m, module_io(original, target_module, x)[1]).double()
        if eq is None:  # every chunk has the same rows per sample
            rows = len(feats) // len(x) * samples
            eq = NormalEquations(0 if well_determined(rows, feats.shape[1]) else min(FOLDS, samples))
        eq.add(feats, y, len(x))
    return eq


def _unrepaired(cut: nn.Module, reader: Reader, cols: torch.Tensor, intercept: bool) -> torch.Tensor:
    """The reader's kept weights (and the intercept its output has now) as a solution: what
    leaving it unrepaired predicts."""
    m = reader.module
    weights = m.weight.detach().flatten(1)[:, cols.to(m.weight.device)].T.double()
    if not intercept:
        return weights
    bias = m.bias.detach().double() if reader.bias_sink == "bias" else torch.zeros(len(weights.T), dtype=torch.float64)
    return torch.cat([weights, bias.to(weights.device)[None]], 0)


def _set_fit(cut: nn.Module, reader: Reader, cols: torch.Tensor, solution: torch.Tensor, intercept: bool) -> None:
    m = reader.module
    with torch.no_grad():
        flat = m.weight.detach().flatten(1).clone()
        flat[:, cols.to(flat.device)] = solution[: len(cols)].T.to(flat.dtype)
        m.weight.copy_(flat.view_as(m.weight))
        if not intercept:
            return
        fitted = solution[len(cols)].to(m.weight.dtype)
        if reader.bias_sink == "bias":
            m.bias.copy_(fitted)
        else:  # the conv has no bias: its BatchNorm's mean absorbs the fitted intercept
            bn = cut.get_submodule(reader.bias_sink)
            bn.running_mean.sub_(fitted.to(bn.running_mean.device))


@torch.no_grad()
def reestimate_batchnorm(cut: nn.Module, original: nn.Module, calibration: Sequence[torch.Tensor]) -> int:
    """`bn`: reset and re-estimate (cumulative average over the calibration data, in train
    mode for BatchNorm only) the statistics of every BatchNorm whose input differs from the
    unpruned model's on the first calibration batch; returns how many."""
    changed = _changed_batchnorms(cut, original, calibration[0])
    if not changed:
        return 0
    saved = {bn: (bn.momentum, bn.training) for bn in changed}
    for bn in changed:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch weighs by its size
        bn.train()
    try:
        for x in calibration:
            cut(x)
    finally:
        for bn, (momentum, training) in saved.items():
            bn.momentum = momentum
            bn.train(training)
    return len(changed)


def _changed_batchnorms(cut: nn.Module, original: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    inputs: dict[str, dict[str, torch.Tensor]] = {"cut": {}, "original": {}}
    for key, model in (("cut", cut), ("original", original)):
        names = {m: n for n, m in model.named_modules()}
        trace_calls(model.eval(), x, [m for m in model.modules() if isinstance(m, BATCHNORM)],
                    lambda m, a, o, key=key, names=names: inputs[key].__setitem__(names[m], a[0].detach()))
    modules = dict(cut.named_modules())
    return [modules[n] for n, a in inputs["cut"].items()
            if n in inputs["original"] and not torch.equal(a, inputs["original"][n])]
