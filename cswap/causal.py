"""Definitions 1 and 2 of the paper: the global causal effect and the three categories.

Everything here is plain numpy/scipy on arrays of scores, vectorised over units, so the
statistics can be checked against scipy directly and reused by every engine.
"""
from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from .errors import ConfigError, NumericalError
from .interfaces import CRITICAL, DETRIMENTAL, NEUTRAL, Decision, SignificanceTest

# Smallest sigma used as a denominator: a true-class probability of exactly 0 (underflow)
# would otherwise make the relative effect infinite or undefined.
SIGMA_FLOOR = 1e-12


def effect(sigma: np.ndarray, sigma_star: np.ndarray, kind: str = "relative",
           higher_is_better: bool = True) -> np.ndarray:
    """Per-observation effect of an intervention; its mean over S is xi (Definition 1).

    `relative` is the paper's (sigma* - sigma) / sigma. It is bounded below by -1 and
    unbounded above, so gains on poorly scored samples can outweigh losses on good ones;
    `absolute` (sigma* - sigma) and `log_ratio` log(sigma*/sigma) are symmetric alternatives.
    For a lower-is-better sigma (a loss, an energy) every effect changes sign, so a positive
    effect still means the cut helped: (sigma - sigma*) / sigma, sigma - sigma*,
    log(sigma/sigma*). `relative` and `log_ratio` need sigma > 0 (`PairedTTest` refuses
    other scores; a float underflow to 0 is floored at SIGMA_FLOOR).
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    sigma_star = np.asarray(sigma_star, dtype=np.float64)
    if kind == "relative":
        change = (sigma_star - sigma) / np.maximum(sigma, SIGMA_FLOOR)
    elif kind == "absolute":
        change = sigma_star - sigma
    elif kind == "log_ratio":
        change = np.log(np.maximum(sigma_star, SIGMA_FLOOR)) - np.log(np.maximum(sigma, SIGMA_FLOOR))
    else:
        raise ValueError(f"unknown effect {kind!r}")
    return change if higher_is_better else -change


def paired_p_values(sigma: np.ndarray, sigma_star: np.ndarray) -> np.ndarray:
    """Two-sided paired t-test p-values of sigma* vs sigma along the last axis.

    A difference with zero variance (a dead unit changes nothing, or fewer than two pairs)
    carries no evidence and gets p = 1 instead of scipy's NaN (or 0 for a constant shift).
    "Zero" allows float64 round-off: a constant shift computed as (s + c) - s is not exact.
    """
    diff = sigma_star - sigma
    n = diff.shape[-1]
    if n < 2:
        return np.ones(diff.shape[:-1])
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # degenerate rows are handled below
        p = stats.ttest_rel(sigma_star, sigma, axis=-1).pvalue
    p = np.asarray(p, dtype=np.float64)
    spread = np.std(diff, axis=-1)
    degenerate = spread <= 1e-12 * np.maximum(1.0, np.abs(diff).max(axis=-1))
    return np.where(degenerate | np.isnan(p), 1.0, p)


class PairedTTest(SignificanceTest):
    """The paper's test: per-class paired t-tests and Definition 2's vote.

    The default effect is `absolute` (xi = mean of sigma* - sigma), chosen by
    benchmarks/recovery.py (docs/results/recovery.md): with least-squares recovery its plans
    gave the best mean SAUCE of the C-SWAP settings over six models. The paper's `relative`
    effect ((sigma* - sigma) / sigma, `--preset paper`) rewards gains on badly scored samples
    more than it penalises losses on good ones, so some units whose removal hurts a class get
    xi > 0 and are removed as "detrimental"; with scores near zero (per-image IoU) it explodes
    (the segmentation DDRNet: SAUCE 15.7 against 43.4 with recovery). The verdict stays the
    paper's global sign of xi (`verdict: global_sign`).

    One addition: differences within `tolerance` are treated as exactly zero. Two networks
    that are mathematically equal (a cut unit vs the same unit removed physically) differ by
    float32 round-off, and a t-test on pure round-off would call it significant 5% of the time.

    The scorer's declarations are honoured (`for_scorer`, called by every `Analysis`): for a
    lower-is-better sigma the effect and "hurt" change sign (the p-values are symmetric), and
    the effects that divide by sigma (`relative`, `log_ratio`) are refused for a scorer that
    declares values <= 0 possible, and for any baseline sigma that is not positive.
    """

    #: set by `for_scorer`: the scorer's direction, and how messages name it
    higher_is_better: bool = True
    scorer: str = "the scoring function"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        alpha: float = Field(0.05, gt=0, lt=1, description="significance level of each test")
        voting: Literal["per_class", "pooled"] = "per_class"
        correction: Literal["none", "holm", "fdr_bh"] = "none"
        effect: Literal["relative", "absolute", "log_ratio"] = "absolute"
        verdict: Literal["global_sign", "per_class_sign"] = "global_sign"
        tolerance: float = Field(1e-6, ge=0, description="|sigma* - sigma| at or below this is 0")

    @property
    def alpha(self) -> float:
        return self.options.alpha

    def with_alpha(self, alpha: float) -> "PairedTTest":
        return self._copy(self.options.model_copy(update={"alpha": alpha}))

    def for_scorer(self, scorer) -> "PairedTTest":
        from .contract import scorer_label

        label = scorer_label(scorer)
        if self.relative_effect and scorer.positive is False:
            raise ConfigError(
                f"{label} declares that its values can be <= 0 (positive = False), and the {self.options.effect} "
                "effect of the test divides by sigma (Definition 1); set test.options.effect: absolute")
        test = self._copy(self.options)
        test.higher_is_better, test.scorer = bool(scorer.higher_is_better), label
        return test

    def _copy(self, options) -> "PairedTTest":
        test = PairedTTest(options)
        test.higher_is_better, test.scorer = self.higher_is_better, self.scorer
        return test

    def effect(self, sigma: np.ndarray, sigma_star: np.ndarray) -> np.ndarray:
        return effect(sigma, sigma_star, self.options.effect, self.higher_is_better)

    @property
    def relative_effect(self) -> bool:
        return self.options.effect in ("relative", "log_ratio")

    @property
    def verdict_by_sign(self) -> bool:
        return self.options.verdict == "global_sign"

    def decide(self, sigma: np.ndarray, sigma_star: np.ndarray, groups: np.ndarray) -> list[Decision]:
        o = self.options
        sigma = np.asarray(sigma, dtype=np.float64)
        sigma_star = np.atleast_2d(np.asarray(sigma_star, dtype=np.float64))
        groups = np.asarray(groups)
        if not np.isfinite(sigma).all() or not np.isfinite(sigma_star).all():
            raise NumericalError("scores contain NaN or infinity; check the model and the scoring function")
        self._check_positive(sigma)
        sign = 1.0 if self.higher_is_better else -1.0
        # round-off is not an effect
        sigma_star = np.where(np.abs(sigma_star - sigma) <= o.tolerance, sigma, sigma_star)
        xi = self.effect(sigma, sigma_star).mean(axis=-1)
        labels = np.unique(groups) if o.voting == "per_class" else np.array([-1])
        p = np.empty((sigma_star.shape[0], len(labels)))
        hurt = np.empty_like(p, dtype=bool)
        for j, k in enumerate(labels):
            mask = groups == k if o.voting == "per_class" else slice(None)
            p[:, j] = paired_p_values(sigma[mask], sigma_star[:, mask])
            hurt[:, j] = sign * (sigma_star[:, mask] - sigma[mask]).mean(axis=-1) < 0
        significant = self._reject(p)
        decisions = []
        for u in range(sigma_star.shape[0]):
            sig = significant[u]
            if not sig.any():
                category = NEUTRAL
            elif o.verdict == "global_sign":
                # Definition 2; xi == 0 with a significant class is kept (the safe side)
                category = DETRIMENTAL if xi[u] > 0 else CRITICAL
            else:
                category = CRITICAL if (sig & hurt[u]).any() else DETRIMENTAL
            decisions.append(Decision(
                category=category,
                xi=float(xi[u]),
                p_values={int(k): float(p[u, j]) for j, k in enumerate(labels)},
                significant=[int(k) for j, k in enumerate(labels) if sig[j]],
            ))
        return decisions

    def _check_positive(self, sigma: np.ndarray) -> None:
        """The relative effects divide by the baseline sigma: refuse it unless it is > 0."""
        if not self.relative_effect or (sigma > 0).all():
            return
        bad = int((sigma <= 0).sum())
        raise ConfigError(
            f"{self.scorer} gave {bad} of {len(sigma)} baseline observations <= 0 (min {sigma.min():.4g}), and the "
            f"{self.options.effect} effect of the test divides by sigma (Definition 1); set test.options.effect: "
            "absolute (and declare positive = False on the scorer)")

    def _reject(self, p: np.ndarray) -> np.ndarray:
        o = self.options
        if o.correction == "none" or p.shape[1] == 1:
            return p < o.alpha
        from statsmodels.stats.multitest import multipletests

        return np.stack([multipletests(row, alpha=o.alpha, method=o.correction)[0] for row in p])
