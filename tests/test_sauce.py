import numpy as np
import pytest

from cswap.sauce import sauce


def test_constant_curve_is_value_times_width():
    x = np.linspace(0, 1, 21)
    assert sauce(x, np.full_like(x, 80.0)) == pytest.approx(80.0)


def test_linear_drop_is_half_the_start():
    x = np.linspace(0, 1, 11)
    assert sauce(x, 90.0 * (1 - x)) == pytest.approx(45.0)
    # a linear curve is integrated exactly by the trapezoid rule, however coarse
    assert sauce([0, 1], [90.0, 0.0]) == pytest.approx(45.0)


def test_step_uses_the_order_of_equal_ratios():
    # 100 % until half the parameters are gone, then 0: area 50
    assert sauce([0, 0.5, 0.5, 1.0], [100, 100, 0, 0]) == pytest.approx(50.0)
    # the same points given out of order of x are sorted (stably)
    assert sauce([0.5, 0, 1.0, 0.5], [100, 100, 0, 0]) == pytest.approx(50.0)


def test_curve_stopping_early_counts_nothing_beyond_its_last_point():
    # flat 60 % measured only up to x = 0.7: 42, not 60
    assert sauce([0, 0.35, 0.7], [60, 60, 60]) == pytest.approx(42.0)


def test_agrees_with_numpy_trapezoid():
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(0, 1, 30))
    y = rng.uniform(0, 100, 30)
    assert sauce(x, y) == pytest.approx(np.trapezoid(y, x))


@pytest.mark.parametrize("x,y", [([0, 1.2], [1, 1]), ([-0.1, 0.5], [1, 1]), ([0, np.nan], [1, 1]), ([0, 1], [1])])
def test_rejects_invalid_points(x, y):
    with pytest.raises(ValueError):
        sauce(x, y)


def test_rejects_a_percentage_given_as_the_ratio():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        sauce([0, 5.0], [90.0, 80.0])
