"""What the stock test can see before it is run: the minimum detectable effect of the paired
t-test on S, and the M_k that would bring it under the threshold.

Under the paper's rule a unit is neutral when its t-test is not significant. With a small S
that says more about the test than about the unit: a test without power calls almost every
unit neutral. So before the analysis, from one forward pass over S (the baseline sigma), this
module says, per voting group, the smallest mean change of sigma the test detects with 80 %
power, in sigma's own units (x 100: points of true-class probability or of IoU).

The model: a unit's cut changes each observation of a group by d_i, with mean delta and
standard deviation s. s is unknown before any cut; it is taken to be the spread of the
baseline sigma in the group (an effect that varies from sample to sample as much as sigma
itself does). The test of the group is the two-sided paired t-test with n - 1 degrees of
freedom at the per-group level: alpha, or alpha / K with a correction over K groups (Holm's
first step, and Benjamini-Hochberg's when a single group is affected, reject only below
alpha / K). Its power at delta is exact under that model: |T| > t_crit with T noncentral t,
noncentrality delta * sqrt(n) / s. Per-class voting calls a unit critical when any group
rejects, so a unit that harms one class is caught only if that class's test detects it:
the worst group's detectable effect is the one the warning speaks of.

For `neutral: equivalent` the same model gives the smallest margin that TOST shows for a
harmless unit (true delta = 0) with 80 % power in a group; computed from the lower bound
P(both one-sided tests reject) >= 1 - 2 P(one does not), which is tight at high power.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import optimize, stats

from .interfaces import INCONCLUSIVE, NEUTRAL, PlanStep, Scores, SignificanceTest

POWER = 0.8  # the conventional target power of a study design
MAX_OBSERVATIONS = 10 ** 7  # search bound for the observations a threshold needs


def _two_sided_power(ncp: float, df: int, alpha: float) -> float:
    crit = stats.t.isf(alpha / 2, df)
    # the far lower tail is negligible at the ncp that matter, and scipy may return NaN there
    return float(stats.nct.sf(crit, df, ncp) + np.nan_to_num(stats.nct.cdf(-crit, df, ncp)))


def detectable_effect(n: int, spread: float, alpha: float, power: float = POWER) -> float:
    """Smallest mean change delta that a two-sided paired t-test on `n` pairs with difference
    standard deviation `spread` rejects at `alpha` with probability `power` (inf if n < 2)."""
    if n < 2:
        return math.inf
    if spread <= 0:
        return 0.0
    return _detectable_ncp(n - 1, alpha, power) * spread / math.sqrt(n)


@functools.lru_cache(maxsize=1024)
def _detectable_ncp(df: int, alpha: float, power: float) -> float:
    """The noncentrality `detectable_effect` needs: it depends on the degrees of freedom, alpha
    and the power alone, so the groups of S that share a size (every class, mostly) share one
    root-find (about 50 ms each: a minute over 1000 classes solved one by one)."""
    high = 1.0
    while _two_sided_power(high, df, alpha) < power:
        high *= 2
    return optimize.brentq(lambda c: _two_sided_power(c, df, alpha) - power, 0.0, high, xtol=1e-10)


def equivalence_margin(n: int, spread: float, alpha: float, power: float = POWER) -> float:
    """Smallest margin TOST (two one-sided tests at `alpha`) shows for a unit that changes
    nothing on average, with probability at least `power` (inf if n < 2)."""
    if n < 2:
        return math.inf
    if spread <= 0:
        return 0.0
    return _equivalence_ncp(n - 1, alpha, power) * spread / math.sqrt(n)


@functools.lru_cache(maxsize=1024)
def _equivalence_ncp(df: int, alpha: float, power: float) -> float:
    """The noncentrality `equivalence_margin` needs (shared across groups, as `_detectable_ncp`)."""
    crit = stats.t.isf(alpha, df)
    miss = (1 - power) / 2  # each one-sided test may fail this often
    high = 1.0
    while stats.nct.cdf(crit, df, high) > miss:
        high *= 2
    return optimize.brentq(lambda c: stats.nct.cdf(crit, df, c) - miss, 0.0, high, xtol=1e-10)


def observations_needed(spread: float, alpha: float, threshold: float, power: float = POWER,
                        effect=detectable_effect) -> int | None:
    """The fewest pairs at which `effect(n, spread, alpha, power)` (the detectable effect, or
    `equivalence_margin`; both decrease with n) is at most `threshold` (None past
    MAX_OBSERVATIONS)."""
    if effect(2, spread, alpha, power) <= threshold:
        return 2
    low, high = 2, 4
    while effect(high, spread, alpha, power) > threshold:
        low, high = high, high * 2
        if high > MAX_OBSERVATIONS:
            return None
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if effect(mid, spread, alpha, power) > threshold else (low, mid)
    return high


@dataclass
class GroupPower:
    group: int  # the class (or -1: all of S, pooled voting)
    observations: int
    spread: float  # standard deviation of the baseline sigma in the group
    detectable: float  # the smallest mean change of sigma detected with POWER
    equivalence_margin: float  # the smallest margin TOST shows for a harmless unit with POWER


@dataclass
class Power:
    """The test's power on S, per voting group, and the M_k that would make it enough: the M_k
    at which every group detects `threshold`, and (under `neutral: equivalent`) the M_k at
    which TOST shows a harmless unit within `margin` in every group."""

    groups: list[GroupPower]
    alpha: float  # the test's level
    group_alpha: float  # the level of each group's test (after the correction's first step)
    voting: str
    correction: str
    threshold: float  # test.options.max_detectable_effect
    samples_per_class: int | None  # M_k of S, when known
    required_samples_per_class: int | None  # to detect `threshold` in every group
    neutral: str = "not_significant"
    margin: float = 0.0
    equivalence_samples_per_class: int | None = None  # to show `margin` in every group (`equivalent`)
    sigma_range: float = math.inf  # max - min of the baseline sigma on S
    sigma_name: str = "sigma"  # how the summary names sigma: the scorer's registered name

    @property
    def worst(self) -> GroupPower:
        return max(self.groups, key=lambda g: g.detectable)

    @property
    def warns(self) -> bool:
        """Whether the test cannot detect `threshold` in some group. Under the paper's rule it
        then calls harmful units neutral and removes them; under `equivalent` it keeps them
        (inconclusive), so the non-critical phase removes little and a target beyond it takes
        units the test could not judge (`judgement_lines` counts them)."""
        return self.worst.detectable > self.threshold

    @property
    def removes_unjudged(self) -> bool:
        """Whether units called neutral may be harmful: the paper's rule on a test that warns."""
        return self.warns and self.neutral == "not_significant"

    def to_json(self) -> dict:
        w = self.worst
        return {"power": POWER, "alpha": self.alpha, "group_alpha": self.group_alpha, "voting": self.voting,
                "correction": self.correction, "neutral": self.neutral, "detectable_effect": _finite(w.detectable),
                "worst_group": w.group,
                "median_detectable_effect": _finite(float(np.median([g.detectable for g in self.groups]))),
                "equivalence_margin": _finite(max(g.equivalence_margin for g in self.groups)),
                "max_detectable_effect": self.threshold, "warning": self.warns,
                "samples_per_class": self.samples_per_class,
                "required_samples_per_class": self.required_samples_per_class,
                "equivalence_samples_per_class": self.equivalence_samples_per_class,
                "groups": {str(g.group): {"observations": g.observations, "spread": round(g.spread, 6),
                                          "detectable_effect": _finite(g.detectable)} for g in self.groups}}

    def lines(self) -> list[str]:
        """What the dry run and the run summary print (a warning line starts with WARNING)."""
        w = self.worst
        where = "over all of S" if w.group == -1 else f"in class {w.group}"
        level = f"alpha {self.alpha:g}" + (f" ({self.group_alpha:.3g} per group, {self.correction})"
                                           if self.group_alpha != self.alpha else "")
        blind = " (more than sigma's whole range on S: the test detects nothing)" if w.detectable > self.sigma_range \
            else ""
        median = _points(float(np.median([g.detectable for g in self.groups])))
        out = [f"detectable effect: {_points(w.detectable)} of {self.sigma_name} {where}{blind}, the worst of "
               f"{len(self.groups)} group(s) (median {median}), with {100 * POWER:.0f} % power: paired t-test "
               f"at {level}, {w.observations} observations"]
        if self.neutral == "equivalent":
            margin = max(g.equivalence_margin for g in self.groups)
            out.append(f"equivalence: a unit is neutral only if shown within +-{_points(self.margin)} in every group, "
                       "else inconclusive and kept; for a change as spread out as sigma itself that takes margins "
                       f"above {_points(margin)} on this S ({_need(self.equivalence_samples_per_class)} reach "
                       f"+-{_points(self.margin)}; a harmless unit usually changes far less)")
        if self.removes_unjudged:
            out.append(f"WARNING: a unit that changes sigma by less than {_points(w.detectable)} {where} is likely "
                       f"to be called neutral and removed (max_detectable_effect {_points(self.threshold)}); "
                       f"{_need(self.required_samples_per_class)} reach it, or set test.options.neutral: equivalent "
                       "to keep what the test cannot judge")
        elif self.warns:
            out.append(f"WARNING: the test cannot detect a change of sigma of less than {_points(w.detectable)} "
                       f"{where} (max_detectable_effect {_points(self.threshold)}); "
                       f"{_need(self.required_samples_per_class)} reach it; units it cannot judge are kept as "
                       "inconclusive, so little is removed without a target, and a target beyond that removes "
                       "units the test could not judge")
        return out


def _need(samples_per_class: int | None) -> str:
    return f"M_k = {samples_per_class} samples per class would" if samples_per_class else "no M_k within reach would"


def _finite(x: float) -> float | None:
    return None if not math.isfinite(x) else round(float(x), 6)


def _points(x: float | None) -> str:
    return "inf" if x is None or not math.isfinite(x) else f"{100 * x:.1f} points"


def modelled(test: SignificanceTest) -> bool:
    """Whether this module models `test`: the stock paired t-test (cswap/causal.py)."""
    from .causal import PairedTTest

    return isinstance(test, PairedTTest)


def power_of(test: SignificanceTest, baseline: Scores, samples_per_class: int | None = None) -> Power | None:
    """The power of `test` on S from its baseline sigma (one forward pass), or None for a test
    this module does not model (anything but the stock paired t-test)."""
    if not modelled(test):
        return None
    o = test.options
    values, groups = np.asarray(baseline.values, dtype=np.float64), np.asarray(baseline.groups)
    labels = np.unique(groups) if o.voting == "per_class" else np.array([-1])
    group_alpha = o.alpha / len(labels) if o.correction != "none" and len(labels) > 1 else o.alpha
    per_group, needed, equivalence = [], [], []
    for k in labels:
        v = values[groups == k] if o.voting == "per_class" else values
        spread = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        per_group.append(GroupPower(int(k), len(v), spread, detectable_effect(len(v), spread, group_alpha),
                                    equivalence_margin(len(v), spread, o.alpha)))
        needed.append((observations_needed(spread, group_alpha, o.max_detectable_effect), len(v)))
        if o.neutral == "equivalent":
            equivalence.append((observations_needed(spread, o.alpha, o.margin, effect=equivalence_margin), len(v)))
    return Power(per_group, o.alpha, group_alpha, o.voting, o.correction, o.max_detectable_effect,
                 samples_per_class, _samples_per_class(needed, samples_per_class), o.neutral, o.margin,
                 _samples_per_class(equivalence, samples_per_class) if equivalence else None,
                 float(values.max() - values.min()) if len(values) else math.inf)


def analysis_power(analysis, manifold, samples_per_class: int | None = None) -> Power | None:
    """`power_of` the analysis's test on S, from one forward pass of the unpruned model (the
    scores checked against the scorer contract, as the engine checks them). For `--dry-run`,
    the run summary and report.json."""
    import torch

    from .contract import check_scores
    from .registry import registered_name

    if not modelled(analysis.test):
        return None  # no forward pass for a test this module does not model
    model, values, groups = analysis.model.eval(), [], []
    with torch.no_grad():
        for x, y in manifold.to(analysis.device):
            scores = check_scores(analysis.scorer, analysis.scorer.score(model(x), y))
            values.append(scores.values)
            groups.append(scores.groups)
    power = power_of(analysis.test, Scores(np.concatenate(values), np.concatenate(groups)), samples_per_class)
    power.sigma_name = f"sigma ({registered_name('scorers', type(analysis.scorer)) or type(analysis.scorer).__name__})"
    return power


def _samples_per_class(needed: list[tuple[int | None, int]], samples_per_class: int | None) -> int | None:
    """M_k at which every group has the observations it needs: a group's observations scale
    with M_k (one per sample for classification, per image and class present for
    segmentation; the pooled group is all of S)."""
    if samples_per_class is None or any(n is None for n, _ in needed):
        return None
    return max(math.ceil(n * samples_per_class / max(have, 1)) for n, have in needed)


def judgement_lines(counts: dict[str, int], removed: Sequence[PlanStep], power: Power | None = None) -> list[str]:
    """Run-summary lines on what the test could not judge: how many units were inconclusive,
    and a warning when the removed steps (`removed`: the plan's prefix that was deployed)
    include units the test could not judge: inconclusive ones (taken from the kept tail to meet
    a target), or, when the paper's rule ran on a test without power (`power.removes_unjudged`),
    units called neutral."""
    lines = []
    inconclusive = counts.get(INCONCLUSIVE, 0)
    if inconclusive:
        lines.append(f"{inconclusive} unit(s) inconclusive: neither significant nor shown within the equivalence "
                     "margin; kept, unless a target needs them")
    taken = sum(1 for s in removed if s.category == INCONCLUSIVE)
    if taken:
        lines.append(f"WARNING: the target was met only by removing {taken} inconclusive unit(s) the test could not "
                     "judge; a larger S (M_k) or a wider margin lets the test judge them")
    blind = sum(1 for s in removed if s.category == NEUTRAL) if power is not None and power.removes_unjudged else 0
    if blind:
        lines.append(f"WARNING: {blind} removed unit(s) were called neutral by a test that cannot detect a change "
                     f"of less than {_points(power.worst.detectable)}; they may not be harmless")
    return lines


def dry_run_lines(analysis, seed: int) -> list[str]:
    """What `--dry-run` says about the test's power: S drawn as the run will draw it, one pass of
    the model as loaded (random weights, when the checkpoint is missing, say little). Nothing
    for a test this module does not model; one line when S cannot be drawn here."""
    from .errors import CSwapError

    if not modelled(analysis.test):
        return []
    try:
        manifold = analysis.task.manifold(seed)
    except (CSwapError, OSError) as exc:
        return [f"power      not measured: S cannot be drawn here ({exc})"]
    first, *rest = analysis_power(analysis, manifold, analysis.task.samples_per_class).lines()
    return [f"power      {first}", *rest]


def judgement(analysis, manifold, plan, removed_units) -> dict:
    """report.json's `judgement`: the test's power on S (None for a test this module does not
    model), the inconclusive units and how many of them the deployed model lost
    (`removed_units`: the replay's), and the lines the run summary prints."""
    power = analysis_power(analysis, manifold, plan.samples_per_class)
    counts, gone = plan.category_counts(), set(removed_units)
    removed = [s for s in plan.steps if s.unit in gone]
    return {"power": power.to_json() if power is not None else None,
            "inconclusive": counts.get(INCONCLUSIVE, 0),
            "inconclusive_removed": sum(1 for s in removed if s.category == INCONCLUSIVE),
            "lines": (power.lines() if power is not None else []) + judgement_lines(counts, removed, power)}
