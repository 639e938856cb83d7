"""Algorithm 1 computed by brute force must match the engine exactly.

The reference here shares no code with the engine: every unit is removed physically with
torch-pruning on a copy, sigma comes from a full forward pass, the statistics from scipy.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch_pruning as tp
from scipy import stats
from torch import nn

import cswap

ALPHA, TOL = 0.05, 1e-6


def _sigma(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(net(x).double(), 1)[torch.arange(len(y)), y].numpy()


def brute_force(model, x, y, layer_names, orders):
    """Algorithm 1 literally: cut = physical removal, per-class paired t-tests, Definition 2."""
    g = copy.deepcopy(model).eval()
    removed: dict[str, list[int]] = {n: [] for n in layer_names}
    s = _sigma(g, x, y)
    yy = y.numpy()
    verdicts, order, critical = {}, [], []
    for name, units in zip(layer_names, orders):
        n = len(units)
        for c in units:
            if n - len(removed[name]) == 1:
                verdicts[f"{name}:{c}"] = ("untested", None)
                continue
            cand = copy.deepcopy(g)
            current = c - sum(r < c for r in removed[name])
            module = cand.get_submodule(name)
            fn = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels
            dg = tp.DependencyGraph().build_dependency(cand, example_inputs=x[:1], verbose=False)
            dg.get_pruning_group(module, fn, [current]).prune()
            s_star = _sigma(cand, x, y)
            d = s_star - s
            d[np.abs(d) <= TOL] = 0.0
            xi = float(np.mean(d / s))
            significant = False
            for k in np.unique(yy):
                m = yy == k
                if np.var(d[m]) == 0:
                    continue
                p = stats.ttest_rel(s[m] + d[m], s[m]).pvalue
                significant |= bool(p < ALPHA)
            category = "neutral" if not significant else ("detrimental" if xi > 0 else "critical")
            verdicts[f"{name}:{c}"] = (category, xi)
            if category == "critical":
                critical.append((xi, f"{name}:{c}"))
            else:
                g, s = cand, s_star
                removed[name].append(c)
                order.append(f"{name}:{c}")
    remaining = {n: len(o) - len(removed[n]) for n, o in zip(layer_names, orders)}
    for xi, unit in sorted(critical, key=lambda t: -t[0]):
        layer = unit.rpartition(":")[0]
        if remaining[layer] > 1:
            remaining[layer] -= 1
            order.append(unit)
    return verdicts, order


def engine_verdicts(plan):
    out = {str(s.unit): (s.category, s.xi) for s in plan.steps}
    for unit, why in plan.protected.items():
        if "not tested" in why:
            out[unit] = ("untested", None)
    return out


@pytest.mark.parametrize("fixture,layers", [
    ("trained_mlp", ["2", "0"]),
    ("trained_cnn", ["3", "0"]),
])
@pytest.mark.parametrize("shuffle", [False, True])
def test_engine_equals_brute_force(request, fixture, layers, shuffle):
    model, x, y = request.getfixturevalue(fixture)
    per_class = int((y == 0).sum())
    plan = cswap.analyze(model, (x, y), samples_per_class=per_class, alpha=ALPHA, seed=3,
                         test_options={"effect": "relative"},  # Definition 1 as the paper writes it
                         shuffle_units=shuffle, progress=False)
    assert list(plan.layers) == layers  # output to input
    rng = np.random.default_rng(3)
    orders = []
    for name in layers:
        n = plan.layers[name]
        orders.append([int(i) for i in rng.permutation(n)] if shuffle else list(range(n)))
    verdicts, order = brute_force(model, x, y, layers, orders)
    mine = engine_verdicts(plan)
    # critical units that would empty a layer are protected by the plan, not listed as steps
    for unit, why in plan.protected.items():
        if unit not in mine:
            mine[unit] = verdicts[unit]
    assert {u: v[0] for u, v in mine.items()} == {u: v[0] for u, v in verdicts.items()}
    for unit, (_, xi) in verdicts.items():
        if xi is not None:
            assert mine[unit][1] == pytest.approx(xi, abs=1e-6), unit
    assert [str(s.unit) for s in plan.steps] == order
    categories = [v[0] for v in verdicts.values()]
    assert "critical" in categories and ({"neutral", "detrimental"} & set(categories)), categories
