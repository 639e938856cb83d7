"""Least-squares recovery that does not fit noise (cswap/heldout.py, cswap/recovery.py).

Two regimes, on a two-layer linear network whose hidden units are the pruning units and
whose second layer is the reader the recovery re-fits:

- well determined (many calibration rows per column): the re-fit is today's plain ridge
  solve, bit for bit (the reference below is the re-fit as it was before held-out data);
- under-determined (fewer than 4 rows per column): where the removed units carry what the
  kept ones cannot predict (independent noise), the plain re-fit fits the calibration set
  and loses on fresh data; the held-out choice stays within a few percent of the unrepaired
  layer, and leaves it unrepaired where no ridge gains on held-out samples. Where the kept
  units carry it (duplicates), the re-fit is kept and generalises. All checked on fresh data
  the recovery never saw.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cswap.heldout import FOLDS, NormalEquations, choose_ridge
from cswap.interfaces import Layer, Unit, UnitGraph
from cswap.recovery import recover

IN, HIDDEN, OUT, RIDGE = 48, 32, 6, 1e-3
REMOVED = list(range(HIDDEN // 2, HIDDEN))  # the second half of the hidden units


def _network(seed: int, duplicates: bool = False) -> nn.Sequential:
    """x -> hidden (orthonormal rows: independent unit-variance units for x ~ N(0, I)) -> out.
    With `duplicates`, hidden unit i + HIDDEN/2 repeats unit i."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, HIDDEN, bias=False), nn.Linear(HIDDEN, OUT, bias=False)).double()
    rows = torch.linalg.qr(torch.randn(IN, HIDDEN, generator=g, dtype=torch.float64))[0].T
    if duplicates:
        rows[HIDDEN // 2:] = rows[: HIDDEN // 2]
    with torch.no_grad():
        model[0].weight.copy_(rows)
        model[1].weight.copy_(torch.randn(OUT, HIDDEN, generator=g, dtype=torch.float64))
    return model.eval()


def _graph() -> UnitGraph:
    reads = [("1.weight", 1, [[c] for c in range(HIDDEN)])]
    frees = [("0.weight", 0, [1] * HIDDEN), ("1.weight", 1, [1] * HIDDEN)]
    return UnitGraph([Layer("0", HIDDEN, 0, ["0"], reads, frees)], {}, (1, IN))


def _cut(model: nn.Module) -> nn.Module:
    cut = copy.deepcopy(model)
    with torch.no_grad():
        cut[1].weight[:, REMOVED] = 0.0
    return cut


def _data(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _recovered(model: nn.Module, calibration: torch.Tensor):
    cut = _cut(model)
    report = recover(cut, model, _graph(), [Unit("0", c) for c in REMOVED], [calibration], ["least_squares"],
                     ridge=RIDGE)
    return cut, report


def _plain_refit(model: nn.Module, calibration: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """The re-fit as it was before held-out data: normal equations accumulated chunk by chunk,
    ridge relative to the mean diagonal, no intercept (the reader has no bias)."""
    kept = [c for c in range(HIDDEN) if c not in REMOVED]
    gram = cross = None
    for x in calibration.split(chunk):
        with torch.no_grad():
            h, y = model[0](x), model(x)
        feats = h[:, kept]
        gram = feats.T @ feats if gram is None else gram + feats.T @ feats
        cross = feats.T @ y if cross is None else cross + feats.T @ y
    lam = RIDGE * gram.diagonal().mean().clamp_min(1e-12)
    solution = torch.linalg.solve(gram + lam * torch.eye(len(kept), dtype=gram.dtype), cross)
    weight = _cut(model)[1].weight.detach().clone()
    weight[:, kept] = solution.T
    return weight


def _fresh_error(model: nn.Module, reader_weight: torch.Tensor, seed: int = 99) -> float:
    x = _data(2000, seed)
    with torch.no_grad():
        return float(((model[0](x) @ reader_weight.T - model(x)) ** 2).mean())


def test_well_determined_refit_is_unchanged_bit_for_bit(one_thread):
    model = _network(0)
    calibration = _data(400, 1)  # 400 rows for 16 columns
    cut, report = _recovered(model, calibration)
    assert torch.equal(cut[1].weight, _plain_refit(model, calibration))
    fit = report.fits["1"]
    assert fit["rows"] == 400 and fit["columns"] == 16 and fit["ridge"] == RIDGE and "held_out_r2" not in fit
    assert report.held_out() == (0, 0) and "held_out" not in report.to_json()


def _held_out_choice(model: nn.Module, calibration: torch.Tensor):
    """The held-out decision computed from the rows directly (no recovery code path)."""
    kept = [c for c in range(HIDDEN) if c not in REMOVED]
    eq = NormalEquations(FOLDS)
    with torch.no_grad():
        eq.add(model[0](calibration)[:, kept], model(calibration), len(calibration))
    return choose_ridge(eq, _cut(model)[1].weight[:, kept].T.detach(), RIDGE, intercept=False)


def test_refit_of_noise_is_left_unrepaired(one_thread):
    """The removed units are independent of the kept ones: a re-fit on 30 rows for 16 columns
    fits the calibration set and makes fresh data worse; here no ridge gains on held-out
    samples, so the layer stays as cut."""
    model, calibration = _network(2), _data(30, 3)
    choice = _held_out_choice(model, calibration)
    assert choice.ridge is None and choice.gain < -choice.gain_se  # clear of the rule's edge
    cut, report = _recovered(model, calibration)
    assert torch.equal(cut[1].weight, _cut(model)[1].weight)  # unrepaired
    fit = report.fits["1"]
    assert fit["ridge"] is None and fit["held_out_r2"] == fit["unrepaired_held_out_r2"]
    assert "held-out" in report.skipped["least_squares:1"] and report.held_out() == (1, 1)
    summary = report.to_json()["held_out"]
    assert summary["refits"] == 1 and summary["left_unrepaired"] == 1
    assert summary["held_out_r2"] == fit["held_out_r2"] and summary["calibration_r2"] == fit["calibration_r2"]
    from cswap.reports import held_out_fit_lines

    line, = held_out_fit_lines(report.to_json())  # the run summary: held-out fit beside calibration fit
    assert f"{fit['held_out_r2']:.3g} on held-out" in line and "1 left unrepaired" in line


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_refit_of_noise_never_costs_fresh_data_much(seed, one_thread):
    """Whatever ridge the held-out folds choose (or none), fresh data lose at most 5 % against
    the unrepaired layer, where the plain re-fit of the same calibration set loses 50 % or
    more (it fits the calibration noise)."""
    model, calibration = _network(seed), _data(30, seed + 1)
    cut, _ = _recovered(model, calibration)
    unrepaired = _fresh_error(model, _cut(model)[1].weight)
    assert _fresh_error(model, cut[1].weight) <= 1.05 * unrepaired
    assert _fresh_error(model, _plain_refit(model, calibration)) >= 1.5 * unrepaired


def test_refit_that_generalises_is_kept(one_thread):
    """The removed units duplicate kept ones: the re-fit recovers them from 30 rows, with the
    ridge chosen on held-out samples, and fresh data confirm it."""
    model, calibration = _network(2, duplicates=True), _data(30, 3)
    choice = _held_out_choice(model, calibration)
    assert choice.ridge is not None and choice.gain > 10 * choice.gain_se
    cut, report = _recovered(model, calibration)
    fit = report.fits["1"]
    assert fit["ridge"] == choice.ridge and fit["held_out_r2"] > 0.99 > fit["unrepaired_held_out_r2"]
    assert report.held_out() == (1, 0) and not report.skipped
    assert _fresh_error(model, cut[1].weight) < 0.01 * _fresh_error(model, _cut(model)[1].weight)


def test_one_calibration_sample_cannot_be_held_out(one_thread):
    model = _network(3)
    cut, report = _recovered(model, _data(1, 4))
    assert torch.equal(cut[1].weight, _cut(model)[1].weight)
    assert "too few" in report.skipped["least_squares:1"]


@pytest.mark.parametrize("rows", [4 * 16 - 1, 4 * 16])
def test_the_regime_boundary_is_rows_per_column(rows, one_thread):
    _, report = _recovered(_network(4), _data(rows, 5))
    assert ("held_out_r2" in report.fits["1"]) == (rows < 4 * 16)


def test_a_wildly_bad_fit_is_one_short_summary_line():
    """An R^2 of -1e250 (a re-fit that explodes on fresh data) is printed in a few characters,
    not as hundreds of digits."""
    from cswap.reports import held_out_fit_lines

    line, = held_out_fit_lines({"held_out": {"refits": 2, "calibration_r2": 0.999, "held_out_r2": -1.5e250,
                                             "unrepaired_held_out_r2": 0.25, "left_unrepaired": 1}})
    assert "-1.5e+250 on held-out" in line and len(line) < 250
