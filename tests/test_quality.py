"""Quality targets (`pruning.max_drop`, `max_class_drop`): the bound, the validation data, the
search by replay, and what `cswap prune` reports (cswap/quality.py, cswap/quality_search.py)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import cswap
from cswap.cli import main
from cswap.errors import ConfigError, DataError
from cswap.interfaces import Outcomes
from cswap.options import Target
from cswap.quality import BOOTSTRAP, EXACT, check, class_report, exact_drop_bound, samples_needed
from cswap.curves import check_per_class
from cswap.quality_search import refuse_unless_measurable
from cswap.replay import ReplayData, adapter_of, prune, replay_steps
from cswap.tasks.classification import ClassificationTask

from conftest import patterns, small_cnn, train

# ---- the bound ------------------------------------------------------------------------------


def _paired(n: int, p10: float, p01: float, rng) -> tuple[Outcomes, Outcomes]:
    """n paired 0/1 outcomes: right then wrong with p10, wrong then right with p01, else the
    same (right with probability 0.8)."""
    kind = rng.choice(4, size=n, p=[p10, p01, 0.8, 1 - 0.8 - p10 - p01])  # 10, 01, 11, 00
    before = np.isin(kind, (0, 2)).astype(float)
    after = np.isin(kind, (1, 2)).astype(float)
    return Outcomes(before), Outcomes(after)


def test_the_exact_bound_covers_a_known_drop_in_at_least_confidence_of_draws():
    """True drop p10 - p01 = 2 points; the bound must cover it in >= 95 % of seeded draws, less
    three binomial standard errors of the simulation itself."""
    rng, draws, truth = np.random.default_rng(0), 2000, 2.0
    covered = 0
    for _ in range(draws):
        before, after = _paired(400, 0.04, 0.02, rng)
        result = check(before, after, None, None, 0.95)
        assert result.method == EXACT
        covered += result.overall.bound >= truth
    assert covered / draws >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / draws)


def test_with_no_answer_changed_the_exact_bound_is_never_zero_and_samples_needed_is_the_first_n_that_meets():
    for n in (30, 300, 3000):
        same = Outcomes(np.tile([1.0, 0.0, 1.0], n)[:n])
        result = check(same, same, None, None, 0.95)
        assert result.overall.drop == 0
        assert result.overall.bound == pytest.approx(100 * (1 - 0.025 ** (1 / n)), rel=1e-9)
        assert result.overall.bound > 0
    for points in (5.0, 1.0):  # 72 and 368: bounds 4.99 / 5.06 and 0.9975 / 1.0002 points, off the edge
        n = samples_needed(points, 0.95)
        assert 100 * exact_drop_bound(0, 0, n, 0.95) <= points < 100 * exact_drop_bound(0, 0, n - 1, 0.95)
    assert (samples_needed(5.0, 0.95), samples_needed(1.0, 0.95)) == (72, 368)


def test_each_class_is_bounded_on_its_own_samples_and_the_worst_class_is_the_largest_bound():
    classes = np.repeat([0, 1, 2], 100)
    before = np.ones(300)
    after = before.copy()
    after[100:104] = 0  # class 1: four answers lost
    after[200:201] = 0  # class 2: one lost
    result = check(Outcomes(before, classes), Outcomes(after, classes), None, 5.0, 0.95)
    for k, lost in ((0, 0), (1, 4), (2, 1)):
        assert result.classes[k].drop == pytest.approx(lost)
        assert result.classes[k].bound == pytest.approx(100 * exact_drop_bound(lost, 0, 100, 0.95))
        assert result.classes[k].samples == 100
    assert result.worst_class() == 1 and not result.met  # class 1's bound is about 9 points
    assert result.overall.bound == pytest.approx(100 * exact_drop_bound(5, 0, 300, 0.95))


def test_the_test_split_report_has_every_class_and_the_class_that_dropped_most():
    """`class_report` (every run's per-class section): the same points as `check`, for a mean
    of answers and for mIoU (a ratio of sums), and no bound (nothing is chosen on it)."""
    classes = np.repeat([0, 1, 2], 100)
    before, after = np.ones(300), np.ones(300)
    after[100:104], after[200:201] = 0, 0
    report = class_report(Outcomes(before, classes, names=["a", "b", "c"]), Outcomes(after, classes))
    assert [report["classes"][k]["drop"] for k in "012"] == [0, 4, 1]
    assert report["drop"] == pytest.approx(5 / 3, abs=1e-4)
    assert report["worst_class"] == {"class": 1, "name": "b", "before": 1.0, "after": 0.96, "drop": 4.0,
                                     "samples": 100}
    inter, worse, union = _miou_population(50, np.random.default_rng(3))
    b, a = Outcomes(inter, None, union), Outcomes(worse, None, union)
    report, result = class_report(b, a), check(b, a, None, None, 0.95)
    assert report["drop"] == pytest.approx(result.overall.drop, abs=1e-4) and "bound" not in report
    assert {k: c["drop"] for k, c in report["classes"].items()} == {
        str(k): pytest.approx(d.drop, abs=1e-4) for k, d in result.classes.items()}
    assert report["worst_class"]["class"] == 1  # the class whose intersections were cut


def _miou_population(size: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image intersections of two models and unions (2 classes): the pruned model loses
    10 % of class 1's intersection on a third of the images."""
    union = rng.integers(50, 150, size=(size, 2)).astype(float)
    inter = np.floor(union * rng.uniform(0.5, 0.9, size=(size, 2)))
    worse = inter.copy()
    hit = rng.random(size) < 1 / 3
    worse[hit, 1] = np.floor(0.9 * worse[hit, 1])
    return inter, worse, union


def test_the_paired_bootstrap_covers_a_known_miou_drop_about_as_often_as_asked():
    """mIoU is a ratio of sums, not a mean of outcomes: the percentile bootstrap is approximate,
    so its coverage is checked against the asked confidence less the simulation's three
    standard errors and a margin of 3 points for the bootstrap's own small-sample bias."""
    rng = np.random.default_rng(1)
    inter, worse, union = _miou_population(100_000, rng)
    miou = lambda i: float(np.mean(i.sum(0) / union.sum(0)))  # noqa: E731
    truth = 100 * (miou(inter) - miou(worse))
    draws, covered = 200, 0
    for _ in range(draws):
        idx = rng.integers(0, len(union), 120)
        result = check(Outcomes(inter[idx], None, union[idx]), Outcomes(worse[idx], None, union[idx]), None, None,
                       0.95, seed=int(rng.integers(1 << 30)))
        assert result.method == BOOTSTRAP
        covered += result.overall.bound >= truth
    assert covered / draws >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / draws) - 0.03


# ---- validation data and outcomes -----------------------------------------------------------


def _split_task(tmp_path, **options) -> ClassificationTask:
    """A task whose S and evaluation share one split (`eval_limit` of its 90 samples graded)."""
    x, y = patterns(30, size=8, seed=4)
    path = tmp_path / "one_split.npz"
    imgs = (x.clamp(-1, 2).add(1).div(3).mul(255)).to(torch.uint8).squeeze(1).numpy()
    rest = {f"validation_{k}": v for k, v in (("images", imgs[:45]), ("labels", y.numpy()[:45]))}
    np.savez(path, data_images=imgs, data_labels=y.numpy(), **rest)
    opts = {"dataset": "npz", "root": str(path), "manifold_split": "data", "eval_split": "data", "eval_limit": 30,
            "samples_per_class": 6, **options}
    return ClassificationTask(ClassificationTask.Options(**opts))


def test_validation_never_overlaps_s_the_calibration_set_or_the_evaluation_samples(tmp_path):
    task = _split_task(tmp_path)
    split = task.split("data")
    s, calibration = task.manifold(3), task.manifold(3, 8)
    for drawn in (s, calibration):  # the recorded indices are the samples drawn
        assert torch.equal(torch.cat([x for x, _ in drawn]), split.load(drawn.indices))
    validation = task.validation(3, [s, calibration], 4)
    assert torch.equal(torch.cat([x for x, _ in validation]), split.load(validation.indices))
    taken = set(validation.indices.tolist())
    assert len(taken) == 12 and np.bincount(split.labels[validation.indices]).tolist() == [4, 4, 4]
    assert not taken & set(s.indices.tolist())
    assert not taken & set(calibration.indices.tolist())
    assert not taken & set(task.eval_indices(len(split)).tolist())
    assert task.validation(3, [s, calibration], 4).indices.tolist() == validation.indices.tolist()  # seeded
    used = np.zeros(len(split), dtype=bool)
    used[np.concatenate([s.indices, calibration.indices, task.eval_indices(len(split))])] = True
    free = min(int((~used & (split.labels == k)).sum()) for k in range(3))
    assert len(task.validation(3, [s, calibration], free)) == 3 * free
    with pytest.raises(DataError, match=f"validation_per_class={free + 1}"):
        task.validation(3, [s, calibration], free + 1)
    declared = _split_task(tmp_path, validation_split="validation")
    assert torch.equal(torch.cat([x for x, _ in declared.validation(3, [s], 5)]),
                       declared.split("validation").load(declared.validation(3, [s], 5).indices))
    with pytest.raises(ValueError, match="evaluation split"):
        _split_task(tmp_path, validation_split="data")


def test_outcomes_on_the_evaluation_split_are_what_evaluate_measures(trained_cnn):
    model, x, y = trained_cnn
    task = ClassificationTask.from_tensors(x, y, 8, test=patterns(20, seed=9))
    outcomes = task.outcomes(model)
    assert outcomes.binary and len(outcomes) == 60
    assert outcomes.metric() == task.evaluate(model)["accuracy"]
    assert outcomes.per_class().tolist() == [float(v.mean()) for v in np.split(outcomes.values, 3)]


# ---- refusals -------------------------------------------------------------------------------


def test_a_task_without_outcomes_or_without_a_per_class_metric_is_refused_naming_it(tmp_path):
    from cswap.tasks.detection import DetectionTask
    from cswap.tasks.detection_scenes import write_npz

    scenes = write_npz(tmp_path / "scenes.npz", {"train": 8, "test": 4}, source="shapes", classes=(0, 1, 2), size=32)
    detection = DetectionTask(DetectionTask.Options(root=scenes, eval_split="test"))
    with pytest.raises(ConfigError, match="task 'detection' declares no per-sample outcomes"):
        refuse_unless_measurable(detection, Target(max_drop=1))
    with pytest.raises(ConfigError, match="task 'detection' declares no per-class metric"):
        check_per_class(detection)  # cswap curve --per-class

    class OverallOnly(ClassificationTask):  # a task whose metric has no per-class breakdown
        per_class_metric = False

    task = OverallOnly(OverallOnly.Options(dataset="tensors"))
    refuse_unless_measurable(task, Target(max_drop=1))
    with pytest.raises(ConfigError, match="declares no per-class metric, so max_class_drop"):
        refuse_unless_measurable(task, Target(max_class_drop=5))


def test_one_target_only_and_the_api_refuses_data_that_cannot_give_validation(quality_setup):
    model, task, plan, _ = quality_setup
    with pytest.raises(ValueError, match="give one target, not flops_ratio and max_drop"):
        Target(max_drop=1, flops_ratio=0.2)
    assert Target(params_ratio=0.5).to(max_drop=1).params_ratio is None
    assert Target(max_drop=1).to(max_class_drop=5).max_drop == 1  # the same kind: a second bound
    x, y = patterns(10, size=8)
    with pytest.raises(ConfigError, match="from_tensors.*test="):
        plan.apply(model, max_drop=1, data=(x, y))
    with pytest.raises(ConfigError, match="validation data"):
        plan.apply(model, max_drop=1, data=task.manifold(0))


# ---- the search -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quality_setup():
    """A small CNN trained on three bar patterns, its task (S from the train tensors, a test
    split of its own) and its C-SWAP plan."""
    x, y = patterns(150, size=8, seed=0)
    model = train(small_cnn(), x, y, steps=150)
    task = ClassificationTask.from_tensors(x, y, 10, test=patterns(40, size=8, seed=7))
    plan = cswap.analyze(model, task, seed=0, progress=False)
    return model, task, plan, Target(max_drop=6, validation_per_class=80)


def test_the_search_keeps_the_largest_prefix_whose_replay_meets_the_target(quality_setup):
    model, task, plan, target = quality_setup
    pruned = prune(plan, model, target, task)
    trace = {e["steps"]: e for e in pruned.search["trace"]}
    k, n = pruned.steps, len(plan.steps)
    assert k > 0 and trace[k]["met"] and (k == n or not trace[k + 1]["met"])  # the bisection's boundary
    assert pruned.search["replays"] <= 2 + math.ceil(math.log2(n))
    data = ReplayData.for_task(task, plan, target)
    before = task.outcomes(model, "cpu", data.validation)
    for steps, entry in trace.items():  # every recorded replay is the deployed model at that prefix
        if steps:
            again = replay_steps(plan, model, steps, target, data, adapter=adapter_of(plan)).model
            assert check(before, task.outcomes(again, "cpu", data.validation), 6, None, 0.95).overall.bound == \
                pytest.approx(entry["bound"], abs=1e-4)
    again = replay_steps(plan, model, k, target, data, adapter=adapter_of(plan)).model
    assert torch.equal(pruned.model(task.example_inputs()), again(task.example_inputs()))


def test_prefer_fastest_times_every_prefix_that_met_and_keeps_one_of_them(quality_setup):
    model, task, plan, target = quality_setup
    pruned = prune(plan, model, target.to(prefer="fastest"), task)
    met = sorted(e["steps"] for e in pruned.search["trace"] if e["met"] and e["steps"] > 0)
    assert sorted(r["steps"] for r in pruned.search["fastest"]) == met and pruned.steps in met
    fastest = min(pruned.search["fastest"], key=lambda r: r["latency_ms"])
    assert pruned.steps == fastest["steps"]


def test_a_quality_target_combines_with_round_to_and_checks_the_aligned_model_it_keeps(quality_setup):
    """The search replays aligned prefixes: the kept model's widths are multiples of round_to,
    and its validation bound is the one the search recorded for it."""
    model, task, plan, target = quality_setup
    aligned = target.to(round_to=4)
    pruned = prune(plan, model, aligned, task)
    widths = [m.out_channels for m in pruned.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert pruned.steps > 0 and widths != [6, 8] and all(w % 4 == 0 or w in (6, 8) for w in widths)
    data = ReplayData.for_task(task, plan, aligned)
    before = task.outcomes(model, "cpu", data.validation)
    kept = check(before, task.outcomes(pruned.model, "cpu", data.validation), 6, None, 0.95)
    assert kept.met and kept.overall.bound == pytest.approx(pruned.search["chosen"]["bound"], abs=1e-4)


def test_a_target_no_prefix_meets_keeps_the_unpruned_model_and_says_why(quality_setup):
    model, task, plan, target = quality_setup
    with pytest.warns(UserWarning, match="unpruned model is kept"):
        pruned = prune(plan, model, target.to(max_drop=0.5), task)
    assert pruned.steps == 0 and pruned.units == []
    message = pruned.search["message"]
    assert "no prefix of the plan meets max_drop 0.5 pt" in message and "at least 736 are needed" in message
    x = task.example_inputs()
    assert torch.allclose(pruned.model(x), model(x), atol=1e-5)


# ---- cswap prune and cswap curve ------------------------------------------------------------

QUALITY = ["--set", "pruning.max_drop=60", "--set", "pruning.max_class_drop=95", "--set",
           "pruning.validation_per_class=4"]


def test_cswap_prune_to_a_quality_target_reports_bound_test_drop_worst_class_and_speedup(config, tmp_path, capsys):
    """The fixture's config names params_ratio 0.3: a `--set` quality target replaces it; with
    `prefer: fastest` the summary names every prefix that met the target, as timed."""
    out = tmp_path / "run"
    assert main(["prune", str(config), "--out", str(out), "--quiet", *QUALITY, "--set", "pruning.prefer=fastest"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    q = report["quality"]
    assert report["target"]["params_ratio"] is None and report["steps_applied"] == q["steps"]
    assert q["validation_samples"] == 12 and q["method"] == "exact"
    assert q["validation"]["bound"] <= 60 and all(c["bound"] <= 95 for c in q["validation"]["classes"].values())
    drop = 100 * (report["before"]["accuracy"] - report["after"]["accuracy"])
    assert q["test"]["drop"] == pytest.approx(drop, abs=5e-5)  # the report keeps 4 decimals of a point
    assert q["speedup_batch1"] == pytest.approx(report["before"]["latency_ms_batch1"] /
                                                report["after"]["latency_ms_batch1"], rel=1e-3)
    assert q["worst_class"]["test_drop"] == q["test"]["classes"][str(q["worst_class"]["class"])]["drop"]
    timed = {r["steps"] for r in q["fastest"]}
    assert timed == {e["steps"] for e in q["trace"] if e["met"] and e["steps"] > 0} and q["steps"] in timed
    assert f"prefer fastest: {len(timed)} prefixes met the target, timed at batch 1" in printed
    for needle in ("quality target: max_drop 60 pt, max_class_drop 95 pt", "upper bound", "test split (measured, "
                   "never used to choose)", "worst class:", "measured speed-up", "replays in"):
        assert needle in printed
    assert (out / "class_metrics.png").stat().st_size > 0 and (out / "quality_search.png").stat().st_size > 0


def test_every_cswap_prune_reports_each_class_on_the_test_split_and_its_worst_class(config, tmp_path, capsys):
    """Not only a quality target: a params_ratio run shows the class the mean hides."""
    out = tmp_path / "run"
    assert main(["prune", str(config), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    per_class = report["per_class"]
    assert "quality" not in report and per_class["samples"] == report["before"]["eval_samples"]
    assert per_class["drop"] == pytest.approx(100 * (report["before"]["accuracy"] - report["after"]["accuracy"]),
                                              abs=5e-5)
    assert set(per_class["classes"]) == {"0", "1", "2"}
    worst = per_class["worst_class"]
    assert worst["drop"] == max(c["drop"] for c in per_class["classes"].values())
    assert f"worst class on the test split: {worst['name']} ({worst['class']})" in capsys.readouterr().out
    assert (out / "class_metrics.png").stat().st_size > 0


def test_dry_run_says_how_many_replays_and_too_few_validation_samples_fail_before_anything_exists(config, tmp_path,
                                                                                                 capsys):
    assert main(["prune", str(config), "--dry-run", *QUALITY]) == 0
    assert "validation samples (4 per class): about" in capsys.readouterr().out
    assert main(["prune", str(config), "--dry-run", "--set", "pruning.max_drop=1"]) == 2  # drawn as the run draws it
    assert "validation_per_class=300" in capsys.readouterr().err
    out = tmp_path / "never"
    assert main(["prune", str(config), "--out", str(out), "--set", "pruning.max_drop=1"]) == 2
    assert "validation_per_class=300" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "never.partial").exists()


def test_cswap_curve_plots_one_curve_per_class(config, tmp_path):
    out = tmp_path / "curve"
    assert main(["curve", str(config), "--criteria", "random", "--seeds", "1", "--ratios", "0.3", "--per-class",
                 "--out", str(out), "--quiet", "--set", "pruning.recovery=none"]) == 0
    rows = json.loads((out / "curve.json").read_text())["rows"]
    assert {"class_0", "class_1", "class_2"} <= set(rows[0]) and rows[0]["class_0"] >= 0
    assert (out / "curve_per_class.png").stat().st_size > 0


def test_segmentation_validation_is_apart_from_s_and_its_outcomes_are_what_evaluate_measures(tmp_path, one_thread):
    pytest.importorskip("mmseg", reason="the segmentation extra is not installed: pip install -e '.[seg]'")
    from cswap import registry
    from cswap.models.mmseg import build_mmseg_model
    from cswap.tasks.cityscapes_fixture import DDRNET, TINY, write_cityscapes

    write_cityscapes(tmp_path, "train", 24, seed=0)
    write_cityscapes(tmp_path, "val", 4, seed=1)
    task = registry.create("tasks", "segmentation", {"root": str(tmp_path), "samples_per_class": 3, "scale": None})
    with pytest.warns(UserWarning, match="appear in no image"):
        s, calibration = task.manifold(0), task.manifold(0, 4)
    validation = task.validation(0, [s, calibration], 3)
    taken = set(validation.indices.tolist())
    assert taken and not taken & set(s.indices.tolist()) and not taken & set(calibration.indices.tolist())
    assert all(n >= 3 for n in validation.class_counts.values())
    images = torch.cat([x for x, _ in validation])
    torch.testing.assert_close(images, task.load("train", validation.indices)[0])  # the indices are the images
    model = build_mmseg_model(DDRNET, TINY).eval()
    task.bind_model(model)
    outcomes = task.outcomes(model)
    assert outcomes.totals is not None and not outcomes.binary
    assert outcomes.metric() == pytest.approx(task.evaluate(model)["mIoU"], abs=5e-5)  # mmseg rounds to 0.01 %


def test_cswap_prune_to_a_quality_target_on_segmentation_bounds_miou_by_a_paired_bootstrap(tmp_path, one_thread,
                                                                                          capsys):
    """The segmentation fixture: mIoU and every class's IoU bounded by the paired bootstrap on
    a declared validation split; without one, its few train images are refused in one line."""
    pytest.importorskip("mmseg", reason="the segmentation extra is not installed: pip install -e '.[seg]'")
    from cswap.tasks.cityscapes_fixture import make_fixture, write_cityscapes

    config = make_fixture(tmp_path / "fx", train_steps=10)
    target = ["--set", "pruning.max_drop=5", "--set", "pruning.max_class_drop=40", "--set",
              "pruning.validation_per_class=5"]
    assert main(["prune", str(config), "--out", str(tmp_path / "never"), *target]) == 2
    assert "fewer than validation_per_class=5; lower pruning.validation_per_class, or give the task a " \
           "validation_split" in capsys.readouterr().err
    write_cityscapes(tmp_path / "fx" / "cityscapes", "validation", 10, seed=2)
    out = tmp_path / "run"
    assert main(["prune", str(config), "--out", str(out), "--quiet", *target,
                 "--set", "task.options.validation_split=validation"]) == 0
    q = json.loads((out / "report.json").read_text())["quality"]
    assert q["method"] == "bootstrap" and 5 <= q["validation_samples"] <= 10 and not q["samples_needed"]
    names = {c["name"] for c in q["validation"]["classes"].values()}
    assert {"road", "building", "sky", "car"} <= names and set(q["test"]["classes"]) == set(q["validation"]["classes"])
    chosen = next(e for e in q["trace"] if e["steps"] == q["steps"])
    assert chosen["bound"] == q["validation"]["bound"] and (q["steps"] == 0 or chosen["met"])
    assert q["steps"] == q["plan_steps"] or any(e["steps"] > q["steps"] and not e["met"] for e in q["trace"])
    assert "mIoU" in capsys.readouterr().out and (out / "class_metrics.png").is_file()
