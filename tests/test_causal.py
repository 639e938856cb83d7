"""Definitions 1 and 2 against scipy/statsmodels directly, on constructed score arrays."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from cswap.causal import PairedTTest, effect, paired_p_values
from cswap.errors import ConfigError, NumericalError


def make(**options):
    """The test with `options`; the paper's rule (neutral = not significant, Definition 2)
    unless `neutral` is given, since most tests here check Definition 2 itself."""
    return PairedTTest(PairedTTest.Options(**{"neutral": "not_significant", **options}))


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


@pytest.fixture()
def quick_multipletests(monkeypatch):
    """statsmodels' multipletests runs a full `gc.collect()` on every call (a second each with
    torch loaded on a busy machine); the reference needs no garbage collection."""
    import gc

    monkeypatch.setattr(gc, "collect", lambda *args: 0)


@pytest.mark.parametrize("method", ["holm", "fdr_bh"])
def test_correction_uses_statsmodels(method, quick_multipletests):
    rng, sigma, groups = scores(classes=5, per_class=20)
    star = sigma + rng.normal(0, 0.05, (20, sigma.size)) + rng.normal(0, 0.02, (20, 1))
    corrected = make(correction=method).decide(sigma, star, groups)
    for u, dec in enumerate(corrected):
        raw = [stats.ttest_rel(star[u, groups == k], sigma[groups == k]).pvalue for k in range(5)]
        reject = multipletests(raw, alpha=0.05, method=method)[0]
        assert dec.significant == [k for k in range(5) if reject[k]]


@pytest.mark.parametrize("method", ["holm", "fdr_bh"])
def test_vectorised_correction_equals_statsmodels_row_by_row(method, quick_multipletests):
    """Random rows, ties, and p-values exactly on a step's threshold (Holm's alpha / (K - j),
    BH's (j + 1) / K * alpha): the same rejections as statsmodels, row by row."""
    from cswap.causal import corrected_rejections

    rng = np.random.default_rng(5)
    k, alpha = 6, 0.05
    rows = [rng.uniform(0, 0.1, k) for _ in range(200)]
    rows += [np.full(k, alpha / k), np.full(k, 0.02), np.array([0.001, 0.001, 0.3, 0.3, 0.01, 0.01])]
    rows += [alpha / np.arange(k, 0, -1), np.arange(1, k + 1) / float(k) * alpha]
    p = np.stack(rows)
    expected = np.stack([multipletests(row, alpha=alpha, method=method)[0] for row in p])
    assert np.array_equal(corrected_rejections(p, alpha, method), expected)


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


# ---- neutral: equivalent (TOST) and the validated alpha (issues 25 and 26) -----------------

def test_tost_matches_statsmodels_ttost_paired():
    """TOST p-values equal statsmodels' reference on constructed pairs: inside, outside and
    straddling the margin, per unit (rows of sigma*)."""
    from statsmodels.stats.weightstats import ttost_paired

    from cswap.causal import equivalence_p_values

    rng, sigma, _ = scores(per_class=30, classes=1)
    shifts = np.array([0.0, 0.004, -0.012, 0.03, -0.05])
    star = sigma + shifts[:, None] + rng.normal(0, 0.02, (len(shifts), sigma.size))
    for margin in (0.01, 0.02, 0.05):
        p = equivalence_p_values(sigma, star, margin)
        for u in range(len(shifts)):
            expected = ttost_paired(star[u], sigma, -margin, margin)[0]
            assert p[u] == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_tost_without_variance_is_decided_by_the_mean():
    from cswap.causal import equivalence_p_values

    _, sigma, _ = scores()
    assert equivalence_p_values(sigma, np.stack([sigma, sigma + 0.01, sigma - 0.03]), 0.02).tolist() == [0, 0, 1]
    assert equivalence_p_values(sigma[:1], sigma[None, :1], 0.02).tolist() == [1.0]  # one pair: no evidence


def _centred(change: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """`change` with its mean removed in every class: a t statistic of exactly 0 (p = 1)."""
    return change - np.array([change[groups == k].mean() for k in groups])


def _three_units(seed=1, per_class=60):
    """A harmless unit (tiny changes), a noisy one (large changes; neither has a mean change
    in any class, so nothing is significant) and a harmful one, on three classes; each far
    from every threshold."""
    rng, sigma, groups = scores(seed, per_class=per_class)
    harmless = sigma + _centred(rng.normal(0, 0.002, sigma.size), groups)
    noisy = sigma + _centred(rng.normal(0, 0.2, sigma.size), groups)
    harmful = sigma - 0.1 + rng.normal(0, 0.01, sigma.size)
    return sigma, np.stack([harmless, noisy, harmful]), groups


@pytest.mark.parametrize("voting", ["per_class", "pooled"])
def test_equivalent_keeps_what_it_cannot_show_harmless(voting):
    sigma, star, groups = _three_units()
    paper = make(voting=voting).decide(sigma, star, groups)
    equivalent = make(voting=voting, neutral="equivalent", margin=0.02).decide(sigma, star, groups)
    assert [d.category for d in paper] == ["neutral", "neutral", "critical"]
    assert [d.category for d in equivalent] == ["neutral", "inconclusive", "critical"]
    assert [d.p_values for d in equivalent] == [d.p_values for d in paper]  # the t-test is the same


def test_equivalence_is_required_in_every_class():
    """Per-class voting: a unit shown harmless in two classes but not the third is inconclusive."""
    rng, sigma, groups = scores(2, per_class=60)
    spread = np.where(groups == 2, 0.2, 0.002)  # the third class: large changes, mean 0
    star = sigma + _centred(rng.normal(0, 1, sigma.size) * spread, groups)
    unit = make(neutral="equivalent", margin=0.02).decide(sigma, star[None], groups)[0]
    pooled = make(voting="pooled", neutral="equivalent", margin=0.02).decide(sigma, star[None], groups)[0]
    assert unit.category == "inconclusive" and not unit.significant
    assert pooled.category == "neutral"  # over all of S the spread is diluted: shown within the margin


@pytest.mark.parametrize("alpha", [0, 1.5, -0.1, 1])
def test_with_alpha_outside_zero_one_is_one_line(alpha):
    with pytest.raises(ConfigError, match="alpha") as info:
        make().with_alpha(alpha)
    assert "\n" not in str(info.value)
    assert make(neutral="equivalent").with_alpha(0.2).options.neutral == "equivalent"  # other options kept


def test_analyze_refuses_alpha_outside_zero_one():
    import torch

    import cswap

    x, y = torch.randn(12, 8), torch.arange(3).repeat(4)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    for alpha in (0, 1.5):
        with pytest.raises(ConfigError, match="alpha"):
            cswap.analyze(model, (x, y), samples_per_class=4, alpha=alpha, progress=False)


def test_sweep_refuses_alpha_outside_zero_one(config, tmp_path, capsys):
    """`cswap sweep --alpha 0` is one line and exit 2, as `cswap prune` is; nothing written."""
    from cswap.cli import main

    out = tmp_path / "sweep"
    assert main(["sweep", str(config), "--alpha", "0.05,0", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "alpha" in err and len(err.splitlines()) == 1
    assert not out.exists()
