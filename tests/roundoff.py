"""How far float32 round-off can move the statistics, for tests that compare two computations.

Two computations of the same network (zeroed weights vs removed channels, a staged vs a full
forward, one CPU's kernels vs another's) differ by float32 round-off. `float32_roundoff`
measures it on the model at hand: the largest logit error of float32 against float64 on the
inputs. Each computation's log sigma is off by at most twice that, so a ratio sigma*/sigma of
two such computations moves by at most 8 times it, relative, and so does the relative
effect's mean of those ratios, 1 + xi. Tolerances are twice that bound (ROUNDOFF_FACTOR).

Decisions (categories, order) are compared exactly, but only on fixtures whose decisions are
out of round-off's reach: `assert_no_knife_edge` re-decides every recorded decision with its
thresholds and observations moved by as much as round-off can move them, and requires the
same categories. A knife-edge fixture is a bad fixture (choose another seed), not a reason
to loosen a tolerance.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from cswap.interfaces import SignificanceTest

ROUNDOFF_FACTOR = 16
ALPHA_MARGIN = 1e-3  # alpha moved by this relative amount either way; p-values move by far less
RELATIVE = {"effect": "relative"}  # the paper's Definition 1: the knife-edge bounds below are for it


def float32_roundoff(model: nn.Module, x: torch.Tensor) -> float:
    """Largest |float32 - float64| of the model's outputs on `x`."""
    with torch.no_grad():
        return (model(x).double() - copy.deepcopy(model).double()(x.double())).abs().max().item()


def output_tolerance(model: nn.Module, x: torch.Tensor) -> float:
    """Absolute tolerance for two float32 computations of this model's outputs on `x` that
    are equal in exact arithmetic (a cut vs a removal, fused vs manual attention): each is off
    by about the measured round-off, never less than float32's resolution at the outputs'
    scale."""
    with torch.no_grad():
        scale = model(x).abs().max().item()
    return ROUNDOFF_FACTOR * max(float32_roundoff(model, x), torch.finfo(torch.float32).eps * scale)


def xi_tolerance(xi: float, roundoff: float) -> float:
    """How far round-off can move a relative effect xi (see the module docstring)."""
    return ROUNDOFF_FACTOR * roundoff * (1.0 + abs(xi))


def decisions(plan) -> list[tuple[str, str]]:
    return [(str(s.unit), s.category) for s in plan.steps]


def reach(sigma: np.ndarray, sigma_star: np.ndarray, roundoff: float) -> np.ndarray:
    """How far round-off can move each sigma* - sigma of true-class probabilities p: a logit
    error e moves p by at most 2 p (1 - p) e <= 2 min(p, 1 - p) e, for both terms (doubled
    by ROUNDOFF_FACTOR as every bound here)."""
    p_hi, p_lo = np.maximum(sigma, sigma_star), np.minimum(sigma, sigma_star)
    return ROUNDOFF_FACTOR * roundoff * np.minimum(p_hi, 1.0 - p_lo)


def xi_reach(sigma: np.ndarray, sigma_star: np.ndarray, roundoff: float) -> float:
    """How far round-off can move the relative effect xi = mean(sigma*/sigma) - 1 of these
    true-class probabilities: each ratio by the relative reach of its two terms. Tighter than
    `xi_tolerance` where samples are confidently right (a p near 1 hardly moves)."""
    def relative(p):
        return ROUNDOFF_FACTOR * roundoff * np.minimum(p, 1.0 - p) / np.maximum(p, 1e-300)

    return float(np.mean(sigma_star / sigma * (relative(sigma) + relative(sigma_star))))


class RecordingTest(SignificanceTest):
    """A significance test that records what it was asked to decide, so a test can check
    afterwards (`assert_no_knife_edge`) that no decision of its fixture was within round-off
    of a threshold."""

    def __init__(self, inner: SignificanceTest):
        super().__init__(inner.options)
        self.inner, self.calls = inner, []

    @property
    def alpha(self) -> float:
        return self.inner.alpha

    def with_alpha(self, alpha: float) -> SignificanceTest:
        return self.inner.with_alpha(alpha)

    def effect(self, sigma, sigma_star):
        return self.inner.effect(sigma, sigma_star)

    @property
    def relative_effect(self) -> bool:
        return self.inner.relative_effect

    @property
    def verdict_by_sign(self) -> bool:
        return self.inner.verdict_by_sign

    def decide(self, sigma, sigma_star, groups):
        self.calls.append((np.array(sigma, dtype=np.float64), np.atleast_2d(np.array(sigma_star, dtype=np.float64)),
                           np.array(groups)))
        return self.inner.decide(sigma, sigma_star, groups)


def assert_no_knife_edge(recorded: RecordingTest, roundoff: float) -> None:
    """Every recorded decision (of a paired_t test on true-class probabilities) keeps its
    category with alpha moved either way, and with the observations that round-off could move
    across the zero tolerance all counted as zero, or none; a significant xi is clear of 0."""
    o = recorded.inner.options
    assert o.effect == "relative", "the bounds here are for the relative effect"
    exact = type(recorded.inner)(o.model_copy(update={"tolerance": 0.0}))  # zeros are given explicitly
    for sigma, stars, groups in recorded.calls:
        for star in stars:
            reference = recorded.inner.decide(sigma, star[None], groups)[0]
            d, r = np.abs(star - sigma), reach(sigma, star, roundoff)
            variants = [type(recorded.inner)(o.model_copy(update={"alpha": o.alpha * f})).decide(sigma, star[None], groups)
                        for f in (1 - ALPHA_MARGIN, 1 + ALPHA_MARGIN)]
            variants += [exact.decide(sigma, np.where(d <= o.tolerance + side * r, sigma, star)[None], groups)
                         for side in (1, -1)]
            for moved in variants:
                assert moved[0].category == reference.category, \
                    f"knife-edge fixture: {reference.category} becomes {moved[0].category} under round-off"
            if reference.category != "neutral":
                assert abs(reference.xi) > xi_reach(sigma, star, roundoff), "knife-edge fixture: xi near 0"
