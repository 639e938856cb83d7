"""Whether a pruned model keeps its quality: the paired drop of the task's metric on validation
data, with a one-sided upper confidence bound on it (the quality target, `pruning.max_drop`).

Why paired: the same validation samples go through the original and the pruned model
(`Task.outcomes`), so the samples whose outcome did not change cancel, and the bound is as
tight as the few changed ones allow. Why a bound and not the drop seen: the drop seen on a
few hundred samples is noisy, and a target met by luck is broken on the next data. The target
holds when the bound is within `max_drop` (and, per class, within `max_class_drop`).

Two methods, chosen by what the metric is made of:

- exact, for a mean of 0/1 outcomes (accuracy). The drop is p10 - p01: the share of samples
  the original got right and the pruned model wrong, minus the reverse. Its bound is the
  Clopper-Pearson upper bound of p10 minus the Clopper-Pearson lower bound of p01, each at
  level (1 - confidence) / 2 (Bonferroni), so it holds at any sample size. It is never zero:
  with no answer changed it is 1 - ((1 - confidence) / 2)^(1/n), which is why a small
  validation set cannot promise a small drop (`samples_needed`). Conservative: the two
  bounds are taken apart and the margins added.
- paired percentile bootstrap, for any other metric (mIoU: a ratio of sums over images, not a
  mean of per-image outcomes). `RESAMPLES` resamples of the validation samples, seeded, each
  counted in both models; the bound is the `confidence` quantile of the resampled drops.
  Approximate (it relies on the resampled drops standing in for new data), not exact.

Per class the same, on the class's samples: each class's bound holds at `confidence` on its
own (not all classes at once: that would need (1 - confidence) / K per class).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .interfaces import Outcomes

EXACT, BOOTSTRAP = "exact", "bootstrap"
RESAMPLES = 2000  # bootstrap resamples: the 95 % quantile's own Monte-Carlo error is then about 0.5 % of its spread
_CHUNK = 250  # resamples weighed at once (the weights are a resamples x samples matrix)


def clopper_pearson_upper(x: int, n: int, level: float) -> float:
    """The exact one-sided upper bound of a binomial proportion after `x` of `n`, at `level`."""
    from scipy.stats import beta

    return 1.0 if x >= n else float(beta.ppf(1.0 - level, x + 1, n - x))


def clopper_pearson_lower(x: int, n: int, level: float) -> float:
    """The exact one-sided lower bound of a binomial proportion after `x` of `n`, at `level`."""
    from scipy.stats import beta

    return 0.0 if x <= 0 else float(beta.ppf(level, x, n - x + 1))


def exact_drop_bound(worse: int, better: int, n: int, confidence: float) -> float:
    """Upper bound (a share, not points) of p10 - p01 after `worse` samples turned wrong and
    `better` turned right out of `n` (module docstring)."""
    level = (1.0 - confidence) / 2
    return clopper_pearson_upper(worse, n, level) - clopper_pearson_lower(better, n, level)


def samples_needed(max_drop: float, confidence: float) -> int | None:
    """The fewest paired samples at which the exact bound of a model that changed no answer is
    within `max_drop` points: n >= log(alpha') / log(1 - D), alpha' = (1 - confidence) / 2;
    None for a zero drop, which no sample size can show."""
    share = max_drop / 100.0
    if share <= 0:
        return None
    if share >= 1:
        return 1
    return math.ceil(math.log((1.0 - confidence) / 2) / math.log1p(-share))


@dataclass
class Drop:
    """One paired comparison: the metric before and after (shares), the drop and its upper
    bound (points), on `samples` samples."""

    before: float
    after: float
    drop: float
    bound: float
    samples: int

    def to_json(self) -> dict:
        return {"before": round(self.before, 6), "after": round(self.after, 6), "drop": round(self.drop, 4),
                "bound": round(self.bound, 4), "samples": int(self.samples)}


@dataclass
class QualityCheck:
    """A pruned model against the original on the same samples: overall and per class, and
    whether the target holds."""

    method: str
    overall: Drop
    classes: dict[int, Drop] = field(default_factory=dict)
    names: list[str] | None = None
    met: bool = False

    def name_of(self, k: int) -> str:
        return _name(self.names, k)

    def worst_class(self) -> int | None:
        """The class whose drop has the largest bound (the one that binds), then the largest drop."""
        if not self.classes:
            return None
        return max(self.classes, key=lambda k: (self.classes[k].bound, self.classes[k].drop, -k))

    def to_json(self) -> dict:
        worst = self.worst_class()
        return {"method": self.method, **self.overall.to_json(), "met": self.met,
                "worst_class": None if worst is None else {"class": worst, "name": self.name_of(worst),
                                                           **self.classes[worst].to_json()},
                "classes": {str(k): {"name": self.name_of(k), **d.to_json()} for k, d in self.classes.items()}}


def check(before: Outcomes, after: Outcomes, max_drop: float | None, max_class_drop: float | None,
          confidence: float, seed: int = 0) -> QualityCheck:
    """The drop from `before` (original) to `after` (pruned), on the same samples, and whether
    its bounds are within `max_drop` and, for every class, `max_class_drop` (points)."""
    _check_paired(before, after)
    exact = before.binary and after.binary
    result = _exact(before, after, confidence) if exact else _bootstrap(before, after, confidence, seed)
    result.names = before.names
    result.met = ((max_drop is None or result.overall.bound <= max_drop)
                  and (max_class_drop is None or all(d.bound <= max_class_drop for d in result.classes.values())))
    return result


def _check_paired(before: Outcomes, after: Outcomes) -> None:
    same = (len(before) == len(after) and (before.totals is None) == (after.totals is None)
            and (before.classes is None or np.array_equal(before.classes, after.classes)))
    if not same or len(before) == 0:
        raise ValueError("outcomes to compare must be of the same samples, in the same order (and not none)")


def _exact(before: Outcomes, after: Outcomes, confidence: float) -> QualityCheck:
    worse = (before.values == 1) & (after.values == 0)
    better = (before.values == 0) & (after.values == 1)

    def drop(mask: np.ndarray) -> Drop:
        n = int(mask.sum())
        w, b = int(worse[mask].sum()), int(better[mask].sum())
        return Drop(float(before.values[mask].mean()), float(after.values[mask].mean()), 100.0 * (w - b) / n,
                    100.0 * exact_drop_bound(w, b, n, confidence), n)

    everything = np.ones(len(before), dtype=bool)
    classes = {} if before.classes is None else {
        int(k): drop(before.classes == k) for k in np.unique(before.classes)}
    return QualityCheck(EXACT, drop(everything), classes)


def _bootstrap(before: Outcomes, after: Outcomes, confidence: float, seed: int) -> QualityCheck:
    n = len(before)
    measured = np.ones((1, n))
    (b_metric, b_class), (a_metric, a_class) = before.resampled(measured), after.resampled(measured)
    rng = np.random.default_rng(seed)
    drops, class_drops = [], []
    for start in range(0, RESAMPLES, _CHUNK):
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=min(_CHUNK, RESAMPLES - start)).astype(np.float64)
        (bm, bc), (am, ac) = before.resampled(weights), after.resampled(weights)
        drops.append(bm - am)
        if bc is not None:
            class_drops.append(bc - ac)
    quantile = lambda values: 100.0 * float(np.nanquantile(values, confidence))  # noqa: E731
    overall = Drop(float(b_metric[0]), float(a_metric[0]), 100.0 * float(b_metric[0] - a_metric[0]),
                   quantile(np.concatenate(drops)), n)
    classes = {}
    if class_drops:
        resampled, counts = np.concatenate(class_drops), before.class_samples()
        for k in np.flatnonzero(np.isfinite(b_class[0]) | np.isfinite(a_class[0])):
            d = float(b_class[0, k] - a_class[0, k]) if np.isfinite(b_class[0, k] - a_class[0, k]) else 0.0
            column = resampled[:, k]
            bound = quantile(column[np.isfinite(column)]) if np.isfinite(column).any() else 100.0 * d
            classes[int(k)] = Drop(_finite(b_class[0, k]), _finite(a_class[0, k]), 100.0 * d, bound, int(counts[k]))
    return QualityCheck(BOOTSTRAP, overall, classes)


def _finite(value: float) -> float:
    return float(value) if np.isfinite(value) else 0.0


def _name(names: list[str] | None, k: int) -> str:
    return names[k] if names and k < len(names) else str(k)


def class_report(before: Outcomes, after: Outcomes) -> dict:
    """The metric of the original (`before`) and of the pruned model (`after`) on the same
    samples, overall and per class, with the class that dropped most (in points): what every run
    reports on its test split, where nothing is chosen, so no bound is taken. Why per class: the
    mean hides a class that pruning wrecked."""
    _check_paired(before, after)
    b, a, counts = before.per_class(), after.per_class(), before.class_samples()
    classes = {}
    for k in [] if b is None else np.flatnonzero(np.isfinite(b) | np.isfinite(a)):
        drop = b[k] - a[k] if np.isfinite(b[k] - a[k]) else 0.0
        classes[str(k)] = {"name": _name(before.names, int(k)), "before": round(_finite(b[k]), 6),
                           "after": round(_finite(a[k]), 6), "drop": round(100.0 * drop, 4), "samples": int(counts[k])}
    worst = max(classes, key=lambda k: (classes[k]["drop"], -int(k)), default=None)
    metric_before, metric_after = before.metric(), after.metric()
    return {"before": round(metric_before, 6), "after": round(metric_after, 6),
            "drop": round(100.0 * (metric_before - metric_after), 4), "samples": len(before), "classes": classes,
            "worst_class": None if worst is None else {"class": int(worst), **classes[worst]}}


def shortfall(result: QualityCheck, max_drop: float | None, max_class_drop: float | None,
              confidence: float) -> list[str]:
    """Why an exact bound cannot be met whatever the model does: the overall sample, or a
    class's, is smaller than `samples_needed` for its target (empty for the bootstrap, which
    has no such floor)."""
    if result.method != EXACT:
        return []
    lines, need = [], samples_needed(max_drop or 0.0, confidence)
    if max_drop is not None and (need is None or result.overall.samples < need):
        lines.append(f"{result.overall.samples} validation samples cannot show a drop within {max_drop:g} points at "
                     f"{confidence:.0%} even when no answer changes: "
                     + (f"at least {need} are needed" if need else "no sample size can show a zero drop"))
    if max_class_drop is not None:
        need = samples_needed(max_class_drop, confidence) or math.inf
        small = [k for k, d in result.classes.items() if d.samples < need]
        if small:
            lines.append(f"{len(small)} class(es) have fewer than the {need} validation samples each that "
                         f"max_class_drop {max_class_drop:g} needs at {confidence:.0%} even when no answer changes "
                         f"(e.g. class {result.name_of(small[0])}: {result.classes[small[0]].samples}); raise "
                         "pruning.validation_per_class")
    return lines
