"""Least squares that does not fit noise: the ridge of an under-determined re-fit chosen on
held-out calibration samples, and no re-fit where none generalises.

A reader's re-fit (`cswap.recovery.refit_least_squares`) solves for `columns` unknowns per
output from `rows` calibration rows (a convolution's rows are samples x positions). Far more
rows than columns (every convolution of the benchmark models) and the solve is well
determined: the recovery keeps its plain ridge, and only the calibration fit is reported. A
system with fewer than `ROWS_PER_COLUMN` rows per column (a classifier reading pooled
features from a few samples per class; the user's 10 ImageNet images) can fit the
calibration set and nothing else. There the samples are split into `FOLDS` folds (each
sample's rows stay in one fold), and for every ridge of a grid the held-out error is
summed over the folds, each fold predicted by the fit on the others. The ridge pulls the
kept weights towards the weights as they are (the unrepaired cut) rather than towards zero,
so a large ridge approaches "no recovery"; where the best ridge of the grid does not beat the
unrepaired weights on held-out data by more than the folds' noise (one standard error), the
layer is left unrepaired. Everything is computed from the
per-fold normal equations (X^T X, X^T Y, sum Y^2), so no row is stored.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

#: rows per column at or above which a least-squares system counts as well determined (the
#: optimism of an unregularised fit, (rows + columns) / (rows - columns), is then at most 5/3;
#: the demo's classifier at M_k = 32 has 320 rows for 65 columns)
ROWS_PER_COLUMN = 4
#: folds of calibration samples for the held-out error (fewer when there are fewer samples)
FOLDS = 5
#: the ridges tried on held-out data: the configured one times 10^k, k = 0 .. RIDGE_STEPS - 1
RIDGE_STEPS = 7


def well_determined(rows: int, columns: int) -> bool:
    return rows >= ROWS_PER_COLUMN * columns


@dataclass
class _Sums:
    """X^T X, X^T Y, sum of Y^2 and of Y, and the row count of one part of the data."""

    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    yy: float = 0.0
    ysum: torch.Tensor | None = None
    rows: int = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        g, c, s = x.T @ x, x.T @ y, y.sum(0)
        self.gram = g if self.gram is None else self.gram + g
        self.cross = c if self.cross is None else self.cross + c
        self.ysum = s if self.ysum is None else self.ysum + s
        self.yy += float((y * y).sum())
        self.rows += len(x)

    def error(self, a: torch.Tensor) -> float:
        """||X a - Y||^2 over this part, from its sums."""
        return float((a * (self.gram @ a)).sum() - 2 * (a * self.cross).sum()) + self.yy

    def variance(self) -> float:
        """||Y - mean(Y)||^2 over this part: the error of the best constant."""
        return self.yy - float((self.ysum * self.ysum).sum()) / max(self.rows, 1)


@dataclass
class NormalEquations:
    """The normal equations of one reader's re-fit, in total (accumulated exactly as a plain
    solve would) and, when held out (`folds` > 1), per fold of samples."""

    folds: int
    total: _Sums = field(default_factory=_Sums)
    parts: list[_Sums] = field(default_factory=list)
    samples: int = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, n_samples: int) -> None:
        """Rows of `n_samples` consecutive samples (sample-major, as `readers.features` gives
        them); sample i of the calibration set goes to fold i mod `folds`."""
        self.total.add(x, y)
        if self.folds > 1:
            if not self.parts:
                self.parts = [_Sums() for _ in range(self.folds)]
            per_sample = len(x) // n_samples
            fold = (torch.arange(n_samples, device=x.device) + self.samples) % self.folds
            fold = fold.repeat_interleave(per_sample)
            for f, part in enumerate(self.parts):
                mask = fold == f
                if mask.any():
                    part.add(x[mask], y[mask])
        self.samples += n_samples

    def r2(self, a: torch.Tensor) -> float:
        """Share of the target's variance that `a` explains on the data it was fitted on."""
        return 1.0 - self.total.error(a) / max(self.total.variance(), 1e-300)


def solve_towards(gram: torch.Tensor, cross: torch.Tensor, ridge: float, prior: torch.Tensor | None,
                  intercept: bool) -> torch.Tensor:
    """argmin ||X A - Y||^2 + lambda ||A_w - prior_w||^2, lambda = ridge * mean(diag(X^T X)) over
    the weight rows (the intercept is not penalised): ridge -> infinity keeps the prior; no
    prior is plain ridge regression towards zero (a well-determined re-fit)."""
    n = gram.shape[0] - int(intercept)
    lam = ridge * gram.diagonal()[:n].mean().clamp_min(1e-12)
    reg = torch.zeros_like(gram)
    reg.diagonal()[:n] = lam
    return torch.linalg.solve(gram + reg, cross if prior is None else cross + reg @ prior)


@dataclass
class HeldOutChoice:
    ridge: float | None  # None: no re-fit clearly beats the unrepaired weights on held-out data
    held_out_r2: float  # of the chosen fit (of the unrepaired weights when ridge is None)
    unrepaired_held_out_r2: float
    gain: float = 0.0  # held-out error of the unrepaired weights minus the best re-fit's, summed over folds
    gain_se: float = 0.0  # its standard error over the folds


def choose_ridge(eq: NormalEquations, prior: torch.Tensor, ridge: float, intercept: bool) -> HeldOutChoice:
    """The grid's ridge with the least summed held-out error, or None where that re-fit does
    not beat the unrepaired weights (`prior`) on held-out data by more than one standard
    error of the difference over the folds (Breiman's one-standard-error rule: a gain within
    the folds' noise is no evidence that the re-fit generalises)."""
    parts = [p for p in eq.parts if p.rows]
    variance = sum(p.variance() for p in parts)
    unrepaired = np.array([p.error(prior) for p in parts])
    errors = {}
    for k in range(RIDGE_STEPS):
        lam = ridge * 10.0 ** k
        errors[lam] = np.array([p.error(solve_towards(eq.total.gram - p.gram, eq.total.cross - p.cross, lam, prior,
                                                      intercept)) for p in parts])
    best = min(errors, key=lambda lam: errors[lam].sum())
    change = unrepaired - errors[best]
    gain, se = float(change.sum()), float(np.sqrt(len(parts)) * change.std(ddof=1))

    def r2(err: float) -> float:
        return 1.0 - err / max(variance, 1e-300)

    if gain <= se:
        return HeldOutChoice(None, r2(unrepaired.sum()), r2(unrepaired.sum()), gain, se)
    return HeldOutChoice(best, r2(errors[best].sum()), r2(unrepaired.sum()), gain, se)
