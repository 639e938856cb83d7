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

from roundoff import ALPHA_MARGIN, float32_roundoff, reach, xi_reach, xi_tolerance

ALPHA, TOL = 0.05, 1e-6

# Tolerances come from the measured float32 round-off of the model (tests/roundoff.py);
# decisions flip only when a statistic lies within round-off of a threshold, and every
# decision of the fixtures is checked to stay the same under every round-off-sized change
# (`decide_robustly`), so categories and order must match exactly on any machine.


def _sigma(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(net(x).double(), 1)[torch.arange(len(y)), y].numpy()


def decide(s: np.ndarray, s_star: np.ndarray, labels: np.ndarray, alpha: float = ALPHA,
           zero: np.ndarray | None = None) -> tuple[str, float]:
    """Definitions 1 and 2 with scipy: differences within TOL (or those in `zero`) are 0,
    per-class paired t-tests, the sign of the mean relative effect."""
    d = s_star - s
    d[np.abs(d) <= TOL if zero is None else zero] = 0.0
    xi = float(np.mean(d / s))
    significant = False
    for k in np.unique(labels):
        m = labels == k
        if np.var(d[m]) > 0:
            significant |= bool(stats.ttest_rel(s[m] + d[m], s[m]).pvalue < alpha)
    return ("neutral" if not significant else ("detrimental" if xi > 0 else "critical")), xi


def decide_robustly(s, s_star, labels, roundoff: float) -> tuple[str, float, float]:
    """`decide`, the unit's category checked to be out of round-off's reach, and how far
    round-off can move its xi.

    Two things can move: every ratio by round-off (`xi_tolerance`), and an observation whose
    |sigma* - sigma| lies within round-off of the zero tolerance TOL can count as zero on one
    machine and not on another (TOL is absolute, so with a small sigma that moves xi by up to
    TOL / (sigma * n)); both variants are computed and the larger shift is added. The category
    must be the same under both, and with alpha moved either way, and a significant xi must be
    clear of 0: otherwise the fixture has a knife-edge unit, which would make the exact
    comparison depend on the CPU (choose another seed)."""
    category, xi = decide(s, s_star, labels)
    d, r = np.abs(s_star - s), reach(s, s_star, roundoff)
    shift = 0.0
    for variant in (dict(alpha=ALPHA * (1 - ALPHA_MARGIN)), dict(alpha=ALPHA * (1 + ALPHA_MARGIN)),
                    dict(zero=d <= TOL - r), dict(zero=d <= TOL + r)):
        moved, moved_xi = decide(s, s_star, labels, **variant)
        assert moved == category, f"knife edge: {category} becomes {moved} with {variant}"
        shift = max(shift, abs(moved_xi - xi))
    assert category == "neutral" or abs(xi) > xi_reach(s, s_star, roundoff) + shift, \
        "knife edge: a significant xi within round-off of 0"
    return category, xi, xi_tolerance(xi, roundoff) + shift


def brute_force(model, x, y, layer_names, orders):
    """Algorithm 1 literally: cut = physical removal, per-class paired t-tests, Definition 2."""
    g = copy.deepcopy(model).eval()
    removed: dict[str, list[int]] = {n: [] for n in layer_names}
    s = _sigma(g, x, y)
    yy = y.numpy()
    verdicts, order, critical = {}, [], []
    roundoff = float32_roundoff(model, x)
    for name, units in zip(layer_names, orders):
        n = len(units)
        for c in units:
            if n - len(removed[name]) == 1:
                verdicts[f"{name}:{c}"] = ("untested", None, None)
                continue
            cand = copy.deepcopy(g)
            current = c - sum(r < c for r in removed[name])
            module = cand.get_submodule(name)
            fn = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels
            dg = tp.DependencyGraph().build_dependency(cand, example_inputs=x[:1], verbose=False)
            dg.get_pruning_group(module, fn, [current]).prune()
            s_star = _sigma(cand, x, y)
            category, xi, tolerance = decide_robustly(s, s_star, yy, roundoff)
            verdicts[f"{name}:{c}"] = (category, xi, tolerance)
            if category == "critical":
                critical.append((xi, f"{name}:{c}", tolerance))
            else:
                g, s = cand, s_star
                removed[name].append(c)
                order.append(f"{name}:{c}")
    remaining = {n: len(o) - len(removed[n]) for n, o in zip(layer_names, orders)}
    for xi, unit, _ in sorted(critical, key=lambda t: -t[0]):
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
                         # Definition 1 as the paper writes it, and its rule: neutral = not significant
                         test_options={"effect": "relative", "neutral": "not_significant"},
                         shuffle_units=shuffle, critical_order="effect",  # the paper's tail order
                         progress=False)
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
    for unit, (_, xi, tolerance) in verdicts.items():
        if xi is not None:
            assert mine[unit][1] == pytest.approx(xi, rel=0, abs=tolerance), unit
    steps = [str(s.unit) for s in plan.steps]
    progressive = plan.num_noncritical
    assert steps[:progressive] == order[:progressive]  # removals: Algorithm 1's order, exactly
    # the critical tail, least beneficial first: the same units, in brute force's order up to
    # swaps of units whose xi are within round-off of each other (such a tie may legitimately
    # fall either way on another CPU)
    tail = steps[progressive:]
    assert sorted(tail) == sorted(order[progressive:])
    for a, b in zip(tail, tail[1:]):
        (_, xi_a, tol_a), (_, xi_b, tol_b) = verdicts[a], verdicts[b]
        assert xi_a >= xi_b - (tol_a + tol_b), (a, b)
    categories = [v[0] for v in verdicts.values()]
    assert "critical" in categories and ({"neutral", "detrimental"} & set(categories)), categories
