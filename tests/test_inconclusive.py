"""`neutral: equivalent` on a real (tiny, trained) model: what the test could not judge is
never removed by Algorithm 1's progressive phase; it waits in the kept tail with the critical
units, and the plan counts it.
"""
from __future__ import annotations

import pytest

import cswap
from cswap.interfaces import CRITICAL_RANKED, PROGRESSIVE

KEPT = {"critical", "inconclusive"}


def _plan(model, x, y, **options):
    return cswap.analyze(model, (x, y), samples_per_class=int((y == 0).sum()), seed=3, progress=False, **options)


@pytest.mark.parametrize("fast", [{}, {"group_testing": True}])
def test_inconclusive_units_are_kept_never_removed(trained_mlp, fast, one_thread):
    model, x, y = trained_mlp
    plan = _plan(model, x, y, test_options={"neutral": "equivalent", "margin": 0.002}, fast=fast)
    counts = plan.category_counts()
    assert counts.get("inconclusive", 0) > 0, counts  # the fixture has units the test cannot judge
    head, tail = plan.steps[:plan.num_noncritical], plan.steps[plan.num_noncritical:]
    assert all(s.phase == PROGRESSIVE and s.category not in KEPT for s in head)
    assert all(s.phase == CRITICAL_RANKED and s.category in KEPT for s in tail)
    listed = sum(1 for s in plan.steps if s.category == "inconclusive")
    protected = sum(1 for why in plan.protected.values() if "not tested" not in why)
    assert listed + protected >= counts["inconclusive"] and listed > 0
    assert sum(counts.values()) == sum(layer for layer in plan.layers.values())  # every unit counted once


def test_applying_a_target_that_takes_inconclusive_units_warns(trained_mlp, one_thread):
    """The API says what the run summary says: a target met by units the test could not judge."""
    import warnings

    model, x, y = trained_mlp
    plan = _plan(model, x, y, test_options={"neutral": "equivalent", "margin": 0.002})
    first = next(i for i, s in enumerate(plan.steps) if s.category == "inconclusive")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan.apply(model, params_ratio=0.0, recovery="none")
    assert not [w for w in caught if "inconclusive" in str(w.message)]
    with pytest.warns(UserWarning, match=r"removing \d+ inconclusive unit"):
        plan.apply(model, params_ratio=1.0, recovery="none")
    assert first >= plan.num_noncritical  # only the tail holds them


def test_the_papers_rule_has_no_inconclusive_units(trained_mlp, one_thread):
    model, x, y = trained_mlp
    paper = _plan(model, x, y, test_options={"neutral": "not_significant"})
    assert "inconclusive" not in paper.category_counts()
    assert all(s.category != "inconclusive" for s in paper.steps)


def test_sweep_over_the_rule_reports_inconclusive_units(config, tmp_path, one_thread):
    """`cswap sweep --test-option neutral=...`: the rule stays a setting (`test.neutral`, apart
    from the `neutral` count), every unit is counted once, inconclusive ones included."""
    import csv

    from cswap.cli import main

    out = tmp_path / "sweep"
    assert main(["sweep", str(config), "--set", "test.name=paired_t", "--samples-per-class", "3",
                 "--test-option", "neutral=not_significant,equivalent", "--test-option", "margin=1e-9",
                 "--ratios", "0,0.5", "--out", str(out), "--quiet"]) == 0
    with open(out / "sweep.csv") as f:
        rows = {r["test.neutral"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"not_significant", "equivalent"}
    assert int(rows["not_significant"]["inconclusive"]) == 0 < int(rows["equivalent"]["inconclusive"])
    assert int(rows["equivalent"]["neutral"]) == 0  # no unit is shown within a margin of 1e-9
    totals = {rule: sum(int(r[c]) for c in ("neutral", "detrimental", "critical", "inconclusive"))
              for rule, r in rows.items()}
    assert totals["not_significant"] == totals["equivalent"]  # the same units, judged differently
    assert "| inconclusive |" in (out / "sweep.md").read_text()
