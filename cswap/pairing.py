"""Whether a significance test can judge a scoring function's observations, asked when the
config is read.

Why: a test declares what it handles through `SignificanceTest.for_scorer` (the stock
paired t-test follows the scorer's direction; the interface's default takes higher-is-better
scores only and raises `NotImplementedError` otherwise). `Analysis` asks it once it is built,
which is after the model, the units and their verification: a custom test that cannot
handle a lower-is-better scorer (a loss) surfaced there as a raw `NotImplementedError`,
minutes in. `paired_for` asks the same question right after both plugins are constructed
and answers it in one line naming both.
"""
from __future__ import annotations

from .errors import ConfigError


def paired_for(test, scorer, test_name: str, scorer_name: str):
    """`test.for_scorer(scorer)`, or a `ConfigError` naming the test, the scorer and why."""
    try:
        return test.for_scorer(scorer)
    except (NotImplementedError, ValueError) as exc:  # the test says it cannot, or not with these options
        direction = "higher-is-better" if getattr(scorer, "higher_is_better", True) else "lower-is-better"
        raise ConfigError(f"test {test_name!r} cannot judge scorer {scorer_name!r} ({direction}): {exc}; choose a test "
                          "that handles it (paired_t does) or another scorer") from None
