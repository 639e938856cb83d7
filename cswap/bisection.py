"""The smallest prefix of a plan that reaches a target, by bisection: the one search every
target uses (parameters with aligned widths, MACs, predicted and measured latency).

Why one helper: every target is monotone in the number of steps replayed (removing more never
adds parameters, MACs or, up to noise, time), so the answer is found with log2(steps)
replays, and the budget of a costly check (a latency measurement) is kept in one place.
"""
from __future__ import annotations

from typing import Callable


def smallest_prefix(reaches: Callable[[int], bool], lo: int, hi: int, *, max_checks: int | None = None) -> int | None:
    """The smallest m in lo..hi with `reaches(m)`, for a `reaches` monotone in m; None when
    even m = hi does not reach. With `max_checks`, at most that many calls after the first
    (hi): the smallest m found to reach by then is returned."""
    if not reaches(hi):
        return None
    checks = 0
    while lo < hi and (max_checks is None or checks < max_checks):
        mid = (lo + hi) // 2
        checks += 1
        if reaches(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi
