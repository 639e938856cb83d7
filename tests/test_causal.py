"""Definitions 1 and 2 against scipy/statsmodels directly, on constructed score arrays."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from cswap.causal import PairedTTest, effect, paired_p_values
from cswap.errors import NumericalError


def make(**options):
    return PairedTTest(PairedTTest.Options(**options))


def scores(seed=0, classes=3, per_class=40):
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(0.3, 0.95, classes * per_class)
    groups = np.repeat(np.arange(classes), per_class)
    return rng, sigma, groups


def test_p_values_match_scipy_per_unit():
    rng, sigma, _ = scores()
    star = sigma + rng.normal(0, 0.05, (5, sigma.size)) + np.linspace(-0.03, 0.03, 5)[:, None]
    p = paired_p_values(sigma, star)
    for u in range(5):
        assert p[u] == pytest.approx(stats.ttest_rel(star[u], sigma).pvalue, rel=1e-12)


def test_zero_variance_is_not_significant():
    _, sigma, groups = scores()
    assert paired_p_values(sigma, sigma[None]).tolist() == [1.0]
    shifted = sigma + 0.1  # a constant shift: scipy says p = 0, we say no evidence
    assert paired_p_values(sigma, shifted[None]).tolist() == [1.0]
    assert make().decide(sigma, sigma[None], groups)[0].category == "neutral"


def test_categories_follow_definition_2():
    rng, sigma, groups = scores()
    noise = rng.normal(0, 0.01, sigma.size)
    hurt = sigma * 0.7 + noise  # significant, xi < 0
    helped = np.minimum(sigma * 1.2 + noise, 1.0)  # significant, xi > 0
    nothing = sigma + rng.normal(0, 1e-3, sigma.size) * (rng.random(sigma.size) < 0.1)
    d = make(effect="relative").decide(sigma, np.stack([hurt, helped, nothing]), groups)
    assert [x.category for x in d] == ["critical", "detrimental", "neutral"]
    assert d[0].xi == pytest.approx(np.mean((hurt - sigma) / sigma))
    assert d[0].xi < 0 < d[1].xi


def test_single_class_effect_is_caught_by_per_class_voting_only():
    rng, sigma, groups = scores(per_class=60)
    star = sigma + rng.normal(0, 0.02, sigma.size)
    star[groups == 2] -= 0.02  # one class of three hurt a little
    star[groups != 2] += 0.0067  # the others helped a little: pooled effect near zero
    per_class = make(voting="per_class").decide(sigma, star[None], groups)[0]
    pooled = make(voting="pooled").decide(sigma, star[None], groups)[0]
    assert 2 in per_class.significant and per_class.category in ("critical", "detrimental")
    expected_pooled = stats.ttest_rel(star, sigma).pvalue
    assert pooled.p_values[-1] == pytest.approx(expected_pooled)
    assert pooled.category == ("neutral" if expected_pooled >= 0.05 else pooled.category)


@pytest.mark.parametrize("method", ["holm", "fdr_bh"])
def test_correction_uses_statsmodels(method):
    rng, sigma, groups = scores(classes=5, per_class=20)
    star = sigma + rng.normal(0, 0.05, (20, sigma.size)) + rng.normal(0, 0.02, (20, 1))
    corrected = make(correction=method).decide(sigma, star, groups)
    for u, dec in enumerate(corrected):
        raw = [stats.ttest_rel(star[u, groups == k], sigma[groups == k]).pvalue for k in range(5)]
        reject = multipletests(raw, alpha=0.05, method=method)[0]
        assert dec.significant == [k for k in range(5) if reject[k]]


def test_per_class_sign_verdict_keeps_units_that_hurt_a_class():
    rng, sigma, groups = scores(per_class=50)
    star = sigma.copy()
    low = groups == 0
    sigma[low] = 0.01  # a class the model gets badly wrong...
    star[low] = 0.05 + rng.normal(0, 0.005, low.sum())  # ...improves a lot in relative terms
    star[groups == 1] = sigma[groups == 1] * 0.8 + rng.normal(0, 0.01, (groups == 1).sum())  # hurt
    paper = make(effect="relative").decide(sigma, star[None], groups)[0]
    per_class = make(effect="relative", verdict="per_class_sign").decide(sigma, star[None], groups)[0]
    absolute = make(effect="absolute").decide(sigma, star[None], groups)[0]
    assert absolute.xi < 0 and absolute.category == "critical"
    assert paper.xi > 0 and paper.category == "detrimental"
    assert per_class.category == "critical"


def test_effect_measures():
    s, t = np.array([0.5, 0.2]), np.array([0.25, 0.4])
    np.testing.assert_allclose(effect(s, t, "relative"), [-0.5, 1.0])
    np.testing.assert_allclose(effect(s, t, "absolute"), [-0.25, 0.2])
    np.testing.assert_allclose(effect(s, t, "log_ratio"), np.log([0.5, 2.0]))
    assert np.isfinite(effect(np.array([0.0]), np.array([0.1]), "relative")).all()


def test_nan_scores_are_an_error():
    _, sigma, groups = scores()
    star = sigma.copy()
    star[3] = np.nan
    with pytest.raises(NumericalError):
        make().decide(sigma, star[None], groups)


def test_unknown_option_is_rejected_by_name():
    with pytest.raises(Exception, match="alfa"):
        PairedTTest.Options(alfa=0.1)
