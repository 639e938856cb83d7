"""The minimum detectable effect (cswap/power.py) against a simulation of the stock test.

The model behind the formula: a unit changes each observation of a class by its effect plus
noise as spread out as the baseline sigma of that class. Simulated units with exactly the
reported effect, judged by `PairedTTest.decide` itself, must be detected about 80 % of the
time; the tolerance is the simulation's binomial error (4 standard errors).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from cswap.causal import PairedTTest
from cswap.interfaces import Scores
from cswap.plan import PruningPlan
from cswap.power import POWER, detectable_effect, equivalence_margin, observations_needed, power_of

SIMULATED = 4000  # units per simulation: binomial standard error sqrt(0.8 * 0.2 / 4000) = 0.0063


def _baseline(per_class: int, spreads: tuple[float, ...], seed: int = 0) -> Scores:
    """Baseline sigma with the given standard deviation in each class (exactly, by rescaling)."""
    rng = np.random.default_rng(seed)
    values, groups = [], []
    for k, s in enumerate(spreads):
        v = rng.normal(0, 1, per_class)
        values.append(0.6 + s * (v - v.mean()) / v.std(ddof=1))
        groups.append(np.full(per_class, k))
    return Scores(np.concatenate(values), np.concatenate(groups))


def _detection_rate(test: PairedTTest, base: Scores, harmed: int, effect: float, spread: float, seed: int) -> float:
    """Share of simulated units, harming class `harmed` by `effect` (noise of sd `spread` on
    every observation), for which the test finds that class significant."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 1, (SIMULATED, len(base.values))) * spread
    star = base.values + noise - effect * (base.groups == harmed)
    decisions = test.decide(base.values, star, base.groups)
    return float(np.mean([harmed in d.significant for d in decisions]))


@pytest.mark.parametrize("per_class,correction", [(2, "none"), (5, "none"), (16, "none"), (16, "holm")])
def test_detection_rate_at_the_reported_effect_is_80_percent(per_class, correction):
    spreads = (0.05, 0.2, 0.1)
    base = _baseline(per_class, spreads)
    test = PairedTTest(PairedTTest.Options(correction=correction))
    power = power_of(test, base, per_class)
    assert power.group_alpha == pytest.approx(0.05 / 3 if correction == "holm" else 0.05)
    tolerance = 4 * np.sqrt(POWER * (1 - POWER) / SIMULATED)
    for g in power.groups:
        assert g.spread == pytest.approx(spreads[g.group], rel=1e-12)
        rate = _detection_rate(test, base, g.group, g.detectable, g.spread, seed=per_class + g.group)
        assert abs(rate - POWER) <= tolerance, (g, rate)
    assert power.worst.group == 1  # the most spread-out class governs the per-class vote


def test_half_the_effect_is_detected_far_less_often():
    base = _baseline(8, (0.1,))
    test = PairedTTest(PairedTTest.Options())
    g = power_of(test, base, 8).groups[0]
    assert _detection_rate(test, base, 0, g.detectable / 2, g.spread, seed=1) < 0.45


def test_pooled_voting_is_one_group_of_all_of_s():
    base = _baseline(10, (0.1, 0.1, 0.1))
    power = power_of(PairedTTest(PairedTTest.Options(voting="pooled")), base, 10)
    assert [g.group for g in power.groups] == [-1] and power.groups[0].observations == 30
    assert power.worst.detectable == pytest.approx(detectable_effect(30, power.groups[0].spread, 0.05))


def test_the_samples_per_class_named_reach_the_threshold():
    base = _baseline(4, (0.05, 0.15))
    test = PairedTTest(PairedTTest.Options(max_detectable_effect=0.05))
    power = power_of(test, base, 4)
    assert power.warns and power.worst.detectable > 0.05
    m = power.required_samples_per_class
    assert detectable_effect(m, 0.15, 0.05) <= 0.05 < detectable_effect(m - 1, 0.15, 0.05)
    assert observations_needed(0.15, 0.05, 0.05) == m
    lines = power.lines()
    assert lines[-1].startswith("WARNING") and f"M_k = {m}" in lines[-1]
    assert all("\n" not in line for line in lines)
    quiet = power_of(PairedTTest(PairedTTest.Options(max_detectable_effect=10.0)), base, 4)
    assert not quiet.warns and not any(line.startswith("WARNING") for line in quiet.lines())


def test_under_equivalence_the_test_names_the_samples_that_show_the_margin():
    """`neutral: equivalent` keeps what the test cannot judge: the lines name the M_k at which
    TOST shows a harmless unit within the margin, and a test without power still warns (it
    will keep most units as inconclusive), naming the M_k that reaches the threshold, but
    never says that neutral units may be harmful."""
    base = _baseline(4, (0.05, 0.15))
    power = power_of(PairedTTest(PairedTTest.Options(neutral="equivalent", margin=0.05, max_detectable_effect=0.01)),
                     base, 4)
    m = power.equivalence_samples_per_class
    assert equivalence_margin(m, 0.15, 0.05) <= 0.05 < equivalence_margin(m - 1, 0.15, 0.05)
    assert power.warns and not power.removes_unjudged and len(power.lines()) == 3
    assert power.lines()[1].startswith("equivalence:") and f"M_k = {m}" in power.lines()[1]
    need = power.required_samples_per_class
    assert detectable_effect(need, 0.15, 0.05) <= 0.01 < detectable_effect(need - 1, 0.15, 0.05)
    assert power.lines()[2].startswith("WARNING: the test cannot detect") and f"M_k = {need}" in power.lines()[2]
    assert "inconclusive" in power.lines()[2] and "called neutral" not in power.lines()[2]


def test_equivalence_margin_is_shown_for_a_harmless_unit_at_least_80_percent():
    """The margin reported for `neutral: equivalent` is a lower bound's: TOST shows a unit
    that changes nothing within it at least 80 % of the time (simulated)."""
    from cswap.causal import equivalence_p_values

    rng = np.random.default_rng(3)
    for n in (4, 16):
        margin = equivalence_margin(n, 0.1, 0.05)
        shown = equivalence_p_values(np.zeros(n), rng.normal(0, 0.1, (SIMULATED, n)), margin) < 0.05
        assert shown.mean() >= POWER - 4 * np.sqrt(POWER * (1 - POWER) / SIMULATED)


def test_a_test_it_does_not_model_has_no_power_estimate():
    from helpers_tiny import AlwaysNeutral

    assert power_of(AlwaysNeutral(), _baseline(4, (0.1,)), 4) is None


def test_too_few_observations_detect_nothing():
    assert detectable_effect(1, 0.1, 0.05) == float("inf")
    assert detectable_effect(8, 0.0, 0.05) == 0.0


def test_summary_lines_name_what_the_test_could_not_judge():
    from cswap.interfaces import CRITICAL_RANKED, PROGRESSIVE, PlanStep, Unit
    from cswap.power import judgement_lines

    steps = [PlanStep(Unit("a", 0), PROGRESSIVE, "neutral"), PlanStep(Unit("a", 1), PROGRESSIVE, "detrimental"),
             PlanStep(Unit("a", 2), CRITICAL_RANKED, "inconclusive"),
             PlanStep(Unit("a", 3), CRITICAL_RANKED, "critical")]
    counts = {"neutral": 1, "detrimental": 1, "inconclusive": 1, "critical": 1}
    assert judgement_lines({"neutral": 3, "critical": 2}, steps[:1]) == []
    non_critical = judgement_lines(counts, steps[:2])
    assert len(non_critical) == 1 and non_critical[0].startswith("1 unit(s) inconclusive")
    target = judgement_lines(counts, steps[:3])
    assert target[-1].startswith("WARNING") and "1 inconclusive" in target[-1]
    paper = PairedTTest.Options(neutral="not_significant", max_detectable_effect=0.01)
    blind = power_of(PairedTTest(paper), _baseline(2, (0.1,)), 2)
    assert blind.warns and "called neutral" in judgement_lines(counts, steps[:2], blind)[-1]


# ---- what a run says: --dry-run, the run summary and report.json ---------------------------

def _prune(config, *args) -> int:
    from cswap.cli import main

    return main(["prune", str(config), "--quiet", "--set", "test.name=paired_t", *args])


@pytest.mark.parametrize("rule, threshold, warning", [
    ([], 1e-6, "units it cannot judge are kept as inconclusive"),  # the default: neutral: equivalent
    (["--preset", "paper"], 1e-6, "likely to be called neutral and removed"),  # the published rule
    ([], 100.0, None)])
def test_dry_run_prints_the_detectable_effect_and_warns_past_the_threshold(config, capsys, one_thread, rule,
                                                                           threshold, warning):
    assert _prune(config, "--dry-run", *rule, "--set", "task.options.samples_per_class=2",
                  "--set", f"test.options.max_detectable_effect={threshold}") == 0
    out = capsys.readouterr().out
    power = [line for line in out.splitlines() if line.startswith("power      detectable effect: ")]
    assert len(power) == 1 and "2 observations" in power[0]
    warned = [line for line in out.splitlines() if line.startswith("WARNING") and "max_detectable_effect" in line]
    assert len(warned) == (warning is not None)
    if warning:  # names the M_k that would reach the threshold (or says none within reach would)
        assert warning in warned[0]
        assert "samples per class would reach it" in warned[0] or "no M_k within reach" in warned[0]


def test_run_counts_inconclusive_units_and_warns_when_a_target_takes_them(config, tmp_path, capsys, one_thread):
    """With a margin no unit can be shown within, nothing is neutral: the units the test could
    not judge are kept by the analysis, and a target beyond the removable units takes some of
    them from the kept tail: report.json counts them and the summary warns."""
    out = tmp_path / "run"
    assert _prune(config, "--out", str(out), "--set", "task.options.samples_per_class=4",
                  "--set", "test.options.neutral=equivalent", "--set", "test.options.margin=1e-9",
                  "--set", "pruning.params_ratio=0.6") == 0
    summary = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    judged = report["judgement"]
    assert judged["inconclusive"] == report["categories"]["inconclusive"] > 0
    assert report["categories"].get("neutral", 0) == 0 and judged["power"]["neutral"] == "equivalent"
    steps = PruningPlan.load(out / "plan.json").steps[:report["steps_applied"]]
    assert judged["inconclusive_removed"] == sum(1 for s in steps if s.category == "inconclusive") > 0
    assert f"{judged['inconclusive']} inconclusive" in summary
    assert f"WARNING: the target was met only by removing {judged['inconclusive_removed']} inconclusive" in summary
    assert all(line in summary for line in judged["lines"])
