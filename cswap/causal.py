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

from .errors import ConfigError, NumericalError, validation_summary
from .interfaces import CRITICAL, DETRIMENTAL, INCONCLUSIVE, NEUTRAL, Decision, SignificanceTest

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


def equivalence_p_values(sigma: np.ndarray, sigma_star: np.ndarray, margin: float) -> np.ndarray:
    """TOST (two one-sided paired t-tests) p-values that the mean of sigma* - sigma lies
    within (-margin, +margin), along the last axis; small p = shown harmless.

    The same statistic as statsmodels' `ttost_paired(sigma_star, sigma, -margin, margin)`
    (the larger of the two one-sided p-values). A difference with zero variance is decided by
    its mean alone (p = 0 inside the margin, 1 outside: a dead unit is equivalent); fewer
    than two pairs carry no evidence (p = 1).
    """
    diff = np.asarray(sigma_star, dtype=np.float64) - np.asarray(sigma, dtype=np.float64)
    n = diff.shape[-1]
    if n < 2:
        return np.ones(diff.shape[:-1])
    mean = diff.mean(axis=-1)
    spread = diff.std(axis=-1, ddof=1)
    degenerate = spread <= 1e-12 * np.maximum(1.0, np.abs(diff).max(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        se = spread / np.sqrt(n)
        above_low = stats.t.sf((mean + margin) / se, n - 1)  # H0: mean <= -margin
        below_high = stats.t.cdf((mean - margin) / se, n - 1)  # H0: mean >= +margin
    p = np.maximum(above_low, below_high)
    return np.where(degenerate, np.where(np.abs(mean) < margin, 0.0, 1.0), p)


def corrected_rejections(p: np.ndarray, alpha: float, method: str) -> np.ndarray:
    """statsmodels' `multipletests(row, alpha, method)[0]` for every row of `p` at once (the
    same comparisons on the same floats; tests/test_causal.py checks them against it), for
    `holm` (step-down: reject the sorted p-values while p_(j) <= alpha / (K - j)) and
    `fdr_bh` (step-up: reject up to the last p_(j) <= (j + 1) / K * alpha). One call per row
    cost a simulation of thousands of units minutes on a loaded machine."""
    k = p.shape[1]
    order = np.argsort(p, axis=1)
    ranked = np.take_along_axis(p, order, axis=1)
    if method == "holm":
        reject = np.logical_and.accumulate(ranked <= alpha / np.arange(k, 0, -1), axis=1)
    elif method == "fdr_bh":
        passed = ranked <= np.arange(1, k + 1) / float(k) * alpha
        reject = np.flip(np.logical_or.accumulate(np.flip(passed, axis=1), axis=1), axis=1)
    else:
        raise ValueError(f"unknown correction {method!r}")
    out = np.empty_like(reject)
    np.put_along_axis(out, order, reject, axis=1)
    return out


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

    What "neutral" means (`neutral`): `not_significant` is the paper's rule (no group's t-test
    rejects), which with a small S says more about the test than about the unit;
    `equivalent` calls a unit neutral only when, in every voting group, TOST shows its mean
    change of sigma within +-`margin` (in sigma's own units: 0.02 = 2 points of true-class
    probability or of IoU). Requiring every group is an intersection-union test, which holds
    its level without a correction; the correction applies to the significance tests. A unit
    with a significant group is critical or detrimental under either rule; under `equivalent`
    the rest are `inconclusive`, kept by Algorithm 1's progressive phase like critical units.
    `equivalent` with a margin of 0.02 is the default, chosen by benchmarks/power.py
    (docs/results/power.md: the demo ResNet-8 and ResNet-20 w8, 3 seeds): at M_k = 2 the paper's
    rule removed 53-59 % of the parameters as non-critical and lost 8 points of accuracy even
    with least-squares recovery (60-65 without), at M_k = 4 1.1-1.6 points; `equivalent` kept
    the repaired non-critical model within 0.4 point, and from M_k = 8 on the two rules made
    nearly the same plans (the same at 32). Margins 0.01, 0.02 and 0.05 gave the same accuracy within the
    seeds' spread. `--preset paper` keeps the published rule. `max_detectable_effect` is the
    largest minimum detectable effect (cswap/power.py, the worst group) a run accepts without
    a warning, in the same units; its default 0.5 lies between the worst-class detectable
    effects of the sample sets whose non-critical units cost more than a point there (M_k <= 4:
    0.71 and more) and of those whose did not (M_k >= 8: 0.40 and less).

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
        neutral: Literal["not_significant", "equivalent"] = Field(
            "equivalent", description="what makes a unit neutral: no significant group (the paper), or "
            "equivalence shown by TOST in every group (the rest are then inconclusive, and kept)")
        margin: float = Field(0.02, gt=0, description="equivalence margin of neutral: equivalent, in sigma's own "
                              "units (0.02 = 2 points of true-class probability or of IoU)")
        max_detectable_effect: float = Field(
            0.5, gt=0, description="warn when the smallest mean change of sigma the test detects with 80 % power "
            "exceeds this, in sigma's own units (cswap/power.py)")

    @property
    def alpha(self) -> float:
        return self.options.alpha

    def with_alpha(self, alpha: float) -> "PairedTTest":
        """Validated like the config's `test.options.alpha` (0 < alpha < 1): at alpha 0 no
        test rejects and every unit would be called neutral."""
        from pydantic import ValidationError

        try:
            options = self.Options.model_validate({**self.options.model_dump(), "alpha": alpha})
        except ValidationError as exc:
            raise ConfigError(f"invalid options for test 'paired_t': {validation_summary(exc)}") from None
        return self._copy(options)

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
        # round-off is not an effect
        sigma_star = np.where(np.abs(sigma_star - sigma) <= o.tolerance, sigma, sigma_star)
        xi = self.effect(sigma, sigma_star).mean(axis=-1)
        labels, p, hurt, equivalent = self._per_group(sigma, sigma_star, groups)
        significant = self._reject(p)
        return [Decision(category=self._category(significant[u], hurt[u], equivalent[u], xi[u]), xi=float(xi[u]),
                         p_values={int(k): float(p[u, j]) for j, k in enumerate(labels)},
                         significant=[int(k) for j, k in enumerate(labels) if significant[u, j]])
                for u in range(sigma_star.shape[0])]

    def _per_group(self, sigma: np.ndarray, sigma_star: np.ndarray, groups: np.ndarray):
        """Per voting group (a class, or all of S when pooled): the t-test's p-values, whether
        the group's mean change hurt, and (under `neutral: equivalent`) whether TOST shows the
        change within the margin."""
        o = self.options
        sign = 1.0 if self.higher_is_better else -1.0
        labels = np.unique(groups) if o.voting == "per_class" else np.array([-1])
        p = np.empty((sigma_star.shape[0], len(labels)))
        hurt = np.empty_like(p, dtype=bool)
        equivalent = np.ones_like(p, dtype=bool)
        for j, k in enumerate(labels):
            mask = groups == k if o.voting == "per_class" else slice(None)
            p[:, j] = paired_p_values(sigma[mask], sigma_star[:, mask])
            hurt[:, j] = sign * (sigma_star[:, mask] - sigma[mask]).mean(axis=-1) < 0
            if o.neutral == "equivalent":
                equivalent[:, j] = equivalence_p_values(sigma[mask], sigma_star[:, mask], o.margin) < o.alpha
        return labels, p, hurt, equivalent

    def _category(self, significant: np.ndarray, hurt: np.ndarray, equivalent: np.ndarray, xi: float) -> str:
        """Definition 2, with `inconclusive` for a unit neither significant nor shown harmless."""
        if significant.any():
            if self.options.verdict == "global_sign":
                # Definition 2; xi == 0 with a significant class is kept (the safe side)
                return DETRIMENTAL if xi > 0 else CRITICAL
            return CRITICAL if (significant & hurt).any() else DETRIMENTAL
        if self.options.neutral == "not_significant" or equivalent.all():
            return NEUTRAL
        return INCONCLUSIVE

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
        return corrected_rejections(p, o.alpha, o.correction)
