"""Every registered criterion on a tiny ResNet and a tiny MobileNetV2, with the real Captum/zennit."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from cswap import registry  # noqa: E402
from cswap.adapters.generic import GenericAdapter  # noqa: E402
from cswap.discovery import discover  # noqa: E402
from cswap.interfaces import PROGRESSIVE, RANKED, Analysis, Unit  # noqa: E402
from cswap.intervention import Intervention  # noqa: E402
from cswap.options import AnalysisOptions, Target  # noqa: E402
from cswap.replay import adapter_of, steps_for  # noqa: E402
from cswap.plan import PruningPlan  # noqa: E402
from cswap.removal import count_params  # noqa: E402

from helpers_tiny import tensor_task, tiny_mobilenet, tiny_resnet  # noqa: E402
from roundoff import output_tolerance  # noqa: E402

ALL = ["random", "magnitude", "cbp", "integrated_gradients", "deeplift", "conductance",
       "internal_influence", "lrp", "amp", "cswap"]
FAST = {"n_steps": 4}  # Captum path integrals: enough steps to run, few enough to be quick
OPTIONS = {"integrated_gradients": FAST, "conductance": FAST, "internal_influence": FAST}
DEAD = Unit("layer1.0.conv1", 3)


def _kill(model, unit: Unit) -> None:
    """Make `layer1.0.conv1` channel 3 dead: no output and no weight reading it."""
    block = model.layer1[0]
    with torch.no_grad():
        block.conv1.weight[unit.channel] = 0
        block.bn1.weight[unit.channel] = 0
        block.bn1.bias[unit.channel] = 0
        block.conv2.weight[:, unit.channel] = 0


@pytest.fixture(scope="module")
def resnet_case():
    model = tiny_resnet()
    _kill(model, DEAD)
    task = tensor_task((1, 28, 28), samples_per_class=2, n=32)
    graph = discover(model, task.example_inputs(), ignored_layers=[model.fc])
    return model, task, graph


@pytest.fixture(scope="module")
def mobilenet_case():
    model = tiny_mobilenet()
    task = tensor_task((3, 16, 16), samples_per_class=2, n=32)
    return model, task, discover(model, task.example_inputs())


def make(name, **options):
    return registry.create("criteria", name, {**OPTIONS.get(name, {}), **options})


def plan_of(criterion, model, graph, task, seed: int, adapter=None, **pruning):
    """The plan of `criterion` on the tiny model: the analysis the core would build, the
    ranking, and the plan made from it (the adapter is the generic one unless given)."""
    adapter = adapter or GenericAdapter()
    analysis = Analysis(model, graph, task, registry.create("scorers", task.default_scorer),
                        registry.create("tests", task.default_test), adapter, adapter.name, torch.device("cpu"),
                        AnalysisOptions(**pruning))
    return PruningPlan.from_analysis(analysis, criterion.rank(analysis, seed))


def check_valid_plan(plan, model, graph, task):
    """A full removal order that replays physically and equals the intervened model."""
    units = [s.unit for s in plan.steps]
    assert len(set(units)) == len(units)
    assert len(units) == graph.num_units - len(graph.layers)  # every unit but one per layer
    assert plan.params_total == count_params(model)
    pruned = plan.apply(model, params_ratio=0.3, recovery="none")
    removed = 1 - count_params(pruned) / count_params(model)
    assert 0.3 <= removed < 0.3 + max(s.params_freed for s in plan.steps) / plan.params_total + 1e-9
    x = task.example_inputs()
    cut = copy.deepcopy(model)
    intervention = Intervention(cut, graph)
    k, _ = steps_for(plan, model, Target(params_ratio=0.3), adapter_of(plan))
    for step in plan.steps[:k]:
        intervention.cut(step.unit)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), cut(x), atol=output_tolerance(cut, x), rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_criterion_on_tiny_resnet(name, resnet_case):
    model, task, graph = resnet_case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_of(make(name), model, graph, task, 0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the criterion changed the model"
    assert plan.method == name
    check_valid_plan(plan, model, graph, task)
    step = next(s for s in plan.steps if s.unit == DEAD)
    if name in ("magnitude", "integrated_gradients", "deeplift", "conductance", "internal_influence", "lrp"):
        # a unit with no weights and no output has the lowest possible importance: 0
        assert step.score == pytest.approx(0.0, abs=1e-12)
        assert step.score == min(s.score for s in plan.steps)
        assert plan.steps[0].score == pytest.approx(0.0, abs=1e-12)
    if name in ("cbp", "cswap"):
        assert step.category == "neutral" and step.xi == 0.0
    if name in ("amp", "cswap"):
        assert step.phase == PROGRESSIVE  # removed during the walk (its cut changes nothing)


@pytest.mark.parametrize("name", ALL)
def test_criterion_on_tiny_mobilenet_v2(name, mobilenet_case):
    model, task, graph = mobilenet_case
    plan = plan_of(make(name), model, graph, task, 1)
    check_valid_plan(plan, model, graph, task)
    if name not in ("amp", "cswap"):
        assert all(s.phase == RANKED for s in plan.steps)
    if name not in ("amp", "cswap", "cbp"):  # cbp orders by category first (its own test)
        scores = [s.score for s in plan.steps]
        assert scores == sorted(scores), "a ranking removes the least important unit first"


def test_random_depends_on_seed_only(resnet_case):
    model, task, graph = resnet_case
    a, b, c = (plan_of(make("random"), model, graph, task, s) for s in (0, 0, 1))
    units = [[s.unit for s in p.steps] for p in (a, b, c)]
    assert units[0] == units[1]
    assert units[0] != units[2]


def test_per_layer_normalisation_gives_unit_mean_magnitude(resnet_case):
    model, task, graph = resnet_case
    plan = plan_of(make("magnitude", normalize="layer"), model, graph, task, 0)
    raw = plan_of(make("magnitude"), model, graph, task, 0)
    scores = {}
    for s in plan.steps:
        scores.setdefault(s.unit.layer, []).append(s.score)
    # the layer's last unit is not in the plan; the mean over all channels is 1
    for layer in graph.layers:
        assert len(scores[layer.name]) == layer.channels - 1
        assert max(scores[layer.name]) < layer.channels  # sum of all = channels
    assert [s.unit for s in plan.steps] != [s.unit for s in raw.steps]
    assert plan.meta["options"]["normalize"] == "layer"


def test_cbp_puts_non_critical_units_first_and_orders_by_xi(resnet_case):
    model, task, graph = resnet_case
    plan = plan_of(make("cbp"), model, graph, task, 0)
    critical = [s.category == "critical" for s in plan.steps]
    assert critical == sorted(critical)  # all non-critical, then all critical
    for block in (False, True):
        xi = [s.xi for s, c in zip(plan.steps, critical) if c == block]
        assert xi == sorted(xi, reverse=True)
    by_xi = plan_of(make("cbp", order="xi"), model, graph, task, 0)
    xi = [s.xi for s in by_xi.steps]
    assert xi == sorted(xi, reverse=True)


@pytest.mark.parametrize("name, options", [
    ("cbp", {}), ("amp", {"tau": 1e-3}), ("amp", {"metric": "mean_sigma", "tau": 1e-4})])
def test_causal_baselines_on_the_staged_engine_give_the_full_forward_plan(resnet_case, name, options):
    from cswap.adapters.resnet import ResNetAdapter

    model, task, graph = resnet_case
    plans = {engine: plan_of(make(name, **options), model, graph, task, 0, adapter=ResNetAdapter(), engine=engine)
             for engine in ("auto", "full")}
    assert plans["auto"].meta["engine"] == "staged" and plans["full"].meta["engine"] == "full"
    assert [s.to_json() for s in plans["auto"].steps] == [s.to_json() for s in plans["full"].steps]
    if name == "amp":  # removals happened, so the engine's cache was updated along the way
        assert 0 < plans["auto"].meta["categories"]["removed"] < graph.num_units - len(graph.layers)


def test_amp_threshold_controls_removal(resnet_case):
    model, task, graph = resnet_case
    everything = plan_of(make("amp", tau=1e9), model, graph, task, 0)
    assert everything.num_noncritical == len(everything.steps)
    strict = plan_of(make("amp", tau=1e-9, metric="mean_sigma"), model, graph, task, 0, critical_order="effect")
    assert 1 <= strict.num_noncritical < len(strict.steps)  # the dead unit at least, not all
    kept = [s.score for s in strict.steps[strict.num_noncritical:]]
    assert kept == sorted(kept) and min(kept) >= 1e-9


def test_unknown_option_is_rejected():
    from cswap.errors import ConfigError

    with pytest.raises(ConfigError, match="normalise"):
        registry.create("criteria", "magnitude", {"normalise": "layer"})


def test_lrp_rewrite_keeps_the_function_and_replaces_every_residual_sum(resnet_case, mobilenet_case):
    from zennit.layer import Sum

    from cswap.criteria.lrp import conv_bn_pairs, residual_sums_as_modules

    for (model, task, _), adds, pairs in ((resnet_case, 3, 9), (mobilenet_case, 1, 10)):
        gm = residual_sums_as_modules(model)
        assert sum(isinstance(m, Sum) for m in gm.modules()) == adds
        assert len(conv_bn_pairs(gm)) == pairs
        x = task.example_inputs()
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x))


def test_deeplift_unsharing_keeps_the_function(resnet_case):
    from cswap.criteria.attribution import _PerCall, unshare_activations

    model, task, _ = resnet_case
    x = torch.randn(3, 1, 28, 28)
    work = unshare_activations(copy.deepcopy(model), x[:1])
    assert isinstance(work.layer1[0].relu, _PerCall) and len(work.layer1[0].relu.copies) == 2
    with torch.no_grad():
        torch.testing.assert_close(work(x), model(x))
        torch.testing.assert_close(work(x), model(x))  # the per-call counter restarts


def test_producers_of_a_residual_stream(resnet_case, mobilenet_case):
    from cswap.criteria.base import channel_sources

    model, _, graph = resnet_case
    names = {m: n for n, m in model.named_modules()}
    stream = [names[m] for m in channel_sources(model, graph.layer("conv1"))]
    assert stream == ["conv1", "layer1.0.conv2"]
    inner = [names[m] for m in channel_sources(model, graph.layer("layer1.0.conv1"))]
    assert inner == ["layer1.0.conv1"]
    model, _, graph = mobilenet_case
    names = {m: n for n, m in model.named_modules()}
    assert {names[m] for m in channel_sources(model, graph.layer("features.3.conv.2"))} == {
        "features.3.conv.2", "features.2.conv.2"}


def test_lrp_refuses_untraceable_models():
    from cswap.criteria.lrp import residual_sums_as_modules
    from cswap.errors import ModelError

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    with pytest.raises(ModelError, match="FX-traceable"):
        residual_sums_as_modules(Branchy())


def test_magnitude_refuses_attention_heads_with_the_reason():
    """ViT heads are the adapter's own units, not torch-pruning channel groups: one clear
    error naming the adapter and what to use instead (was a raw torch-pruning ValueError)."""
    timm = pytest.importorskip("timm")
    from cswap import registry
    from cswap.build import analysis_for
    from cswap.errors import ModelError
    from cswap.options import AnalysisOptions
    from cswap.tasks.classification import ClassificationTask

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, in_chans=1,
                              embed_dim=16, depth=2, num_heads=2, mlp_ratio=2, num_classes=3).eval()
    task = ClassificationTask.from_tensors(torch.randn(24, 1, 8, 8), torch.arange(3).repeat(8), samples_per_class=8)
    a = analysis_for(model, task, progress=False, options=AnalysisOptions(verify_units=False))
    assert a.adapter_name == "vit"
    with pytest.raises(ModelError, match="adapter vit prunes units of its own"):
        registry.create("criteria", "magnitude").rank(a, 0)
