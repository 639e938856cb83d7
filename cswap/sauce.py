"""SAUCE, the Sparsity AUC Estimator of the paper (Fig. 4, Table 3).

SAUCE is the area under a pruning curve: x is the fraction of the model's parameters removed,
in [0, 1], and y the metric (accuracy, mIoU) *in percent*, integrated with the trapezoid rule.
A model that keeps 100 % at every ratio would score 100, so values compare with Table 3.

Curves that stop before x = 1. No structured pruning can remove every parameter: each layer
keeps at least one channel, and the layers that are never pruned (the head) keep theirs. The
rule here is that *only the measured part of the curve counts*: the area is taken from the
first to the last point, and everything beyond the last point counts as 0 (likewise before
the first point, although curves normally start at x = 0). Why this rule:
 - it never credits accuracy that was not measured (extending the last value flat to x = 1
   would reward a criterion whose curve simply stopped early);
 - every criterion on the same model reaches the same last ratio (a full removal order
   leaves one channel per layer whatever the order), so the rule does not favour any method;
 - it matches "area under the plotted curve", which is what a reader of Fig. 5 sees.
The fraction that could not be removed is reported beside SAUCE by `cswap curve` so two models
with different unprunable remainders are not compared blindly.

Points with the same x are kept in the order they were given, so a vertical drop (a step) is
represented by two points at the same x and has zero width, as the trapezoid rule needs.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


def _validate(ratios: np.ndarray, values: np.ndarray) -> None:
    if ratios.shape != values.shape or ratios.ndim != 1:
        raise ValueError(f"ratios and values must be 1-D of the same length, got {ratios.shape} and {values.shape}")
    if not (np.isfinite(ratios).all() and np.isfinite(values).all()):
        raise ValueError("ratios and values must be finite")
    if ((ratios < 0) | (ratios > 1)).any():
        bad = ratios[(ratios < 0) | (ratios > 1)][0]
        raise ValueError(f"a ratio is the fraction of parameters removed, in [0, 1]; got {bad}")


def sauce(ratios: Iterable[float], values: Iterable[float]) -> float:
    """Area under the curve (ratios in [0, 1], values in percent), zero outside the points.

    Points are sorted by ratio (stable, so equal ratios keep their given order: a step).
    A single point, or none, has no width and gives 0.
    """
    x = np.asarray(list(ratios), dtype=np.float64)
    y = np.asarray(list(values), dtype=np.float64)
    _validate(x, y)
    if len(x) < 2:
        return 0.0
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
