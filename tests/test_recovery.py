"""Recovery after removal and compensated cuts (issue #16): exact where the code promises it.

- A compensated cut equals the physical removal with the same fold or update, on every
  adapter (float64, to 1e-9 of the output scale), as the plain cut == removal is checked.
- A trial and its commit give the same bits; a trial is undone exactly.
- Each recovery leaves an unpruned model unchanged; the recovered model reloads in a fresh
  process and agrees with the run's cut model; calibration never touches the evaluation data.
- The compensated analysis gives the same plan on every exact engine and unit batch.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from cswap.build import resolve_adapter
from cswap.compensation import make_intervention
from cswap.interfaces import RANKED, Manifold, PlanStep
from cswap.models.cifar_resnet import cifar_resnet8
from cswap.plan import PruningPlan
from cswap.options import AnalysisOptions, Target
from cswap.replay import ReplayData, replay_steps

from conftest import cswap_plan, patterns, randomize_batchnorm, small_mlp, train
from removal_check import pick_units

KINDS = ("mean", "least_squares")


def _sample_set(x: torch.Tensor, y: torch.Tensor) -> Manifold:
    return Manifold([(x, y)], {int(c): int((y == c).sum()) for c in y.unique()})


def _trained_resnet(seed: int = 3):
    x, y = patterns(20, classes=3, size=12, seed=11)
    torch.manual_seed(seed)
    model = cifar_resnet8(width=6, in_channels=1, num_classes=3)
    return train(randomize_batchnorm(model).train(), x, y, steps=40).eval(), x, y


def _mobilenet():
    from cswap.models.small_mobilenet import fmnist_mobilenetv2

    torch.manual_seed(0)
    x, y = patterns(8, classes=3, size=28, seed=5)
    return randomize_batchnorm(fmnist_mobilenetv2(num_classes=3, width=8, last_channel=32)).eval(), x, y


def _vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, in_chans=1,
                              embed_dim=16, depth=2, num_heads=2, mlp_ratio=2, num_classes=3).eval()
    return model, torch.randn(24, 1, 8, 8), torch.arange(3).repeat(8)


def _mlp():
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    return small_mlp().eval(), x, torch.arange(3).repeat(10)


MODELS = {"resnet": _trained_resnet, "mobilenetv2": _mobilenet, "vit": _vit, "generic": _mlp}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", list(MODELS))
def test_compensated_cut_equals_removal_on_every_adapter(family, kind, one_thread):
    """The replay's cut model (compensated cuts) and its physical removal are one network:
    float64, to 1e-9 of the output scale; the compensation is not vacuous (it differs from
    the zero cut by far more than round-off)."""
    model, x, y = MODELS[family]()
    model, x = model.double(), x.double()
    name, adapter = resolve_adapter("auto", model)
    graph = adapter.units(model, x[:1])
    units = pick_units(graph, per_layer=2)
    plan = PruningPlan.build(model, graph, [PlanStep(u, RANKED) for u in units], method="test", adapter=name,
                             intervention=kind)
    compensated = replay(plan, model, len(units), adapter=adapter, graph=graph, sample_set=_sample_set(x, y))
    zero = replay(dataclasses.replace(plan, intervention="zero"), model, len(units), adapter=adapter, graph=graph)
    with torch.no_grad():
        cut, removed, zero_cut = compensated.cut(x), compensated.model(x), zero.cut(x)
    scale = max(cut.abs().max().item(), 1.0)
    assert (cut - removed).abs().max().item() <= 1e-9 * scale
    assert (cut - zero_cut).abs().max().item() > 1e-6 * scale, "the compensation changed nothing"


def replay(plan: PruningPlan, model, k: int, *, adapter, graph, sample_set=None, recovery: str = "none"):
    """`cswap.replay.replay_steps` with the cut model kept, on S as calibration data."""
    return replay_steps(plan, model, k, Target(recovery=recovery), ReplayData(sample_set, sample_set),
                        adapter=adapter, graph=graph, keep_cut=True)


@pytest.mark.parametrize("kind", ("zero", *KINDS))
def test_trial_equals_commit_bitwise_and_is_undone_exactly(kind, one_thread):
    """What the test judges (a trial) is what is committed, to the bit, and a trial leaves
    every parameter and buffer as it found it."""
    model, x, y = _trained_resnet()
    _, adapter = resolve_adapter("auto", model)
    graph = adapter.units(model, x[:1])
    units = [layer.units()[0] for layer in graph.layers]
    work = copy.deepcopy(model)
    intervention = make_intervention(kind, work, graph, model, _sample_set(x, y), ridge=AnalysisOptions().ridge)
    with torch.no_grad():
        for unit in units[:3]:
            with intervention.trial([unit]):
                tried = work(x)
            intervention.cut_all([unit])
            assert torch.equal(tried, work(x)), unit
        state = {k: v.clone() for k, v in work.state_dict().items()}
        with intervention.trial([units[3]]):
            pass
    assert all(torch.equal(state[k], v) for k, v in work.state_dict().items())


@pytest.mark.parametrize("method", ("bias", "bn", "least_squares", "least_squares+bn"))
def test_recovery_leaves_an_unpruned_model_unchanged(method, one_thread):
    """Nothing removed, nothing to repair: each recovery returns the same function (to
    round-off of the solves, scaled by the outputs)."""
    model, x, y = _trained_resnet()
    _, adapter = resolve_adapter("auto", model)
    graph = adapter.units(model, x[:1])
    plan = PruningPlan.build(model, graph, [PlanStep(u, RANKED) for u in pick_units(graph)], method="test",
                             adapter="resnet")
    replayed = replay(plan, model, 0, adapter=adapter, graph=graph, sample_set=_sample_set(x, y), recovery=method)
    with torch.no_grad():
        a, b = model(x), replayed.model(x)
    assert (a - b).abs().max().item() <= 1e-4 * max(a.abs().max().item(), 1.0)


def test_least_squares_recovery_repairs_what_removal_broke(one_thread):
    """Half of every layer removed: the least-squares re-fit brings the outputs back towards
    the unpruned model's on the calibration data (a real repair, not a no-op)."""
    model, x, y = _trained_resnet()
    _, adapter = resolve_adapter("auto", model)
    graph = adapter.units(model, x[:1])
    units = [u for layer in graph.layers for u in layer.units()[: layer.channels // 2]]
    plan = PruningPlan.build(model, graph, [PlanStep(u, RANKED) for u in units], method="test", adapter="resnet")
    s = _sample_set(x, y)
    plain = replay(plan, model, len(plan.steps), adapter=adapter, graph=graph)
    fixed = replay(plan, model, len(plan.steps), adapter=adapter, graph=graph, sample_set=s, recovery="least_squares")
    with torch.no_grad():
        target = model(x)
        before, after = (plain.model(x) - target).norm().item(), (fixed.model(x) - target).norm().item()
    assert after < 0.5 * before, (before, after)
    assert fixed.recovery.to_json()["methods"] == "least_squares"


@pytest.mark.parametrize("kind", KINDS)
def test_compensated_plan_is_the_same_on_every_exact_engine(kind, one_thread):
    """staged == full, and unit batches of 1 and 3, for the compensated interventions: the
    engines are speed-ups of one computation, whatever the cut does."""
    from cswap.tasks.classification import ClassificationTask

    model, x, y = _trained_resnet()
    task = ClassificationTask.from_tensors(x, y, samples_per_class=20)
    plans = [cswap_plan(model, task, engine=engine, unit_batch=batch, intervention=kind).to_json()
             for engine, batch in (("full", 1), ("staged", 1), ("staged", 3))]
    assert plans[0]["steps"] and plans[0] == plans[1] == plans[2]
    assert plans[0]["intervention"] == kind


def test_recovered_run_reloads_in_a_fresh_process(config, tmp_path, one_thread):
    """`cswap prune` with a compensated cut and recovery: the saved model reloads elsewhere
    (`cswap.load_pruned`) and computes what the run's self-checked model computed; the
    report says what recovery did and how long it took."""
    from cswap.cli import main

    out = tmp_path / "run"
    assert main(["prune", str(config), "--out", str(out), "--quiet", "--set", "pruning.intervention=mean",
                 "--set", "pruning.recovery=least_squares+bn", "--set", "pruning.params_ratio=0.3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["intervention"] == "mean" and report["recovery"]["methods"] == "least_squares+bn"
    assert report["recovery"]["seconds"] >= 0 and report["self_check_max_abs_diff"] < 1e-4
    x = torch.randn(5, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    code = (f"import torch, cswap; m = cswap.load_pruned({str(out)!r}); "
            f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    import cswap

    with torch.no_grad():
        here = cswap.load_pruned(out)(x)
    elsewhere = torch.load(tmp_path / "y.pt")
    assert torch.allclose(here, elsewhere, rtol=0, atol=1e-5 * max(here.abs().max().item(), 1.0))


def test_calibration_is_drawn_from_the_sample_split_never_the_evaluation():
    """The calibration set comes from the split S comes from, so it and the evaluation
    share no sample, even when it is larger than S (the two splits are told apart by value)."""
    from torch import nn

    from cswap.tasks.classification import ClassificationTask

    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(90, 1, 4, 4, generator=g), torch.randn(60, 1, 4, 4, generator=g) + 10.0
    labels = torch.arange(90) % 3
    task = ClassificationTask.from_tensors(train_x, labels, samples_per_class=4, test=(test_x, labels[:60]))
    calibration = torch.cat([b for b, _ in task.manifold(0, 20)])
    assert len(calibration) == 60 and float(calibration.max()) < 5.0
    seen = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    task.evaluate(model)
    assert seen and float(torch.cat(seen).min()) > 5.0


def test_amp_judges_the_compensated_cut_and_its_plan_replays_with_it(one_thread):
    """AMP with `intervention: least_squares` records the cut in its plan, and the replay
    compensates the same way: the pruned model equals its cut model."""
    from dataclasses import replace as with_options

    from cswap import registry
    from cswap.build import analysis_for
    from cswap.options import AnalysisOptions
    from cswap.tasks.classification import ClassificationTask

    model, x, y = _trained_resnet()
    task = ClassificationTask.from_tensors(x, y, samples_per_class=20)
    a = analysis_for(model, task, progress=False, options=AnalysisOptions(verify_units=False))
    plans = {kind: PruningPlan.from_analysis(a, registry.create("criteria", "amp").rank(
        with_options(a, options=a.options.model_copy(update={"intervention": kind})), 0))
        for kind in ("zero", "least_squares")}
    assert plans["least_squares"].intervention == "least_squares" and not plans["zero"].compensated
    plan = plans["least_squares"]
    out = replay(plan, model, len(plan.steps) // 2, adapter=a.adapter, graph=a.units, sample_set=task.manifold(0))
    with torch.no_grad():
        cut, removed = out.cut(x), out.model(x)
    assert (cut - removed).abs().max().item() <= 1e-4 * max(cut.abs().max().item(), 1.0)


@pytest.mark.parametrize("kind", ["least_squares"])  # `mean` removes nothing on this fixture: nothing to replay
def test_compensated_analysis_resumes_to_the_uninterrupted_plan(kind, one_thread):
    """Stopped mid-run after a removal and resumed from the saved state: replayed removals apply
    their compensations (and the Gram downdates) again, so the plan is the uninterrupted one."""
    from cswap.build import analysis_for
    from cswap.options import AnalysisOptions
    from cswap.pruner import progressive_prune
    from cswap.tasks.classification import ClassificationTask

    model, x, y = _trained_resnet()
    task = ClassificationTask.from_tensors(x, y, samples_per_class=20)
    a = analysis_for(model, task, progress=False, options=AnalysisOptions(verify_units=False, intervention=kind))
    whole = progressive_prune(a, 0)
    saved = []

    class Stop(Exception):
        pass

    def checkpoint(state):
        saved.append(json.loads(json.dumps(state)))
        if len(state["decisions"]) >= 10 and any(d["category"] != "critical" for d in state["decisions"]):
            raise Stop  # mid-run, with a removal among the decisions to replay

    with pytest.raises(Stop):
        progressive_prune(a, 0, checkpoint=checkpoint, checkpoint_seconds=0.0)
    assert len(saved[-1]["decisions"]) < len(whole.steps)
    resumed = progressive_prune(a, 0, resume=saved[-1])
    assert [s.to_json() for s in resumed.steps] == [s.to_json() for s in whole.steps]


@pytest.mark.parametrize("overrides,needle", [
    (["pruning.recovery=least_square"], "recovery 'least_square'"),
    (["pruning.engine=delta", "pruning.intervention=mean"], "engine delta"),
    (["pruning.intervention=mean", "pruning.recovery=bias"], "recovery bias folds"),
])
def test_inconsistent_recovery_settings_are_one_line(config, tmp_path, capsys, overrides, needle):
    """A misspelt recovery, the delta engine with a compensated cut, a mean fold twice: each
    refused before anything is created, with one line naming it, exit status 2."""
    from cswap.cli import main

    sets = [arg for o in overrides for arg in ("--set", o)]
    assert main(["prune", str(config), "--out", str(tmp_path / "r"), "--quiet", *sets]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], errors
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.partial").exists()  # refused before anything runs


def test_a_compensated_plan_needs_its_sample_set_to_replay():
    """The compensation is measured on S: without it the replay would deploy a different model."""
    from cswap.errors import ConfigError

    model, x, y = _trained_resnet()
    name, adapter = resolve_adapter("auto", model)
    graph = adapter.units(model, x[:1])
    plan = PruningPlan.build(model, graph, [PlanStep(u, RANKED) for u in pick_units(graph)], method="test",
                             adapter=name, intervention="mean")
    with pytest.raises(ConfigError, match=r"needs the data it was analysed with"):
        plan.apply(model, params_ratio=0.1, recovery="none")
    assert plan.apply(model, params_ratio=0.1, recovery="none", data=_sample_set(x, y)) is not None
