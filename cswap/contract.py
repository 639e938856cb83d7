"""What a scoring function hands back is what its interface promises, checked at the boundary.

Why: the engine turns every batch's `Scores` into the arrays the statistics run on. A scorer
that returns torch tensors, arrays of another length than its groups, or 2-D arrays would
otherwise be accepted silently (numpy converts a CPU tensor, broadcasting hides a shape
error) and give wrong decisions far from their cause; a CUDA tensor fails deep in numpy.
The check is a few comparisons per batch; the message names the scorer and what it returned.
"""
from __future__ import annotations

import numpy as np

from .errors import ConfigError
from .interfaces import Scores, ScoringFunction


class ScorerContractError(ConfigError):
    """A scoring function returned something its interface does not allow."""


def scorer_label(scorer: ScoringFunction) -> str:
    """How messages name a scorer: its registered name when it has one, and its class."""
    from .registry import registered_name

    cls = type(scorer)
    name = registered_name("scorers", cls)
    return f"scorer {name!r} ({cls.__name__})" if name else f"scorer {cls.__module__}.{cls.__qualname__}"


def check_scores(scorer: ScoringFunction, scores) -> Scores:
    """`scores` if it keeps the contract of `ScoringFunction.score` (the interface's
    docstring), else a `ScorerContractError` naming the scorer and what is wrong."""
    problem = _problem(scores)
    if problem:
        raise ScorerContractError(f"{scorer_label(scorer)} broke the scoring contract: {problem} "
                                  "(docs/design.md, section 5)")
    return scores


def _problem(scores) -> str | None:
    if not isinstance(scores, Scores):
        return f"score() returned a {type(scores).__name__}, not cswap.interfaces.Scores"
    for name in ("values", "groups"):
        array = getattr(scores, name)
        if not isinstance(array, np.ndarray):
            hint = " (convert with .detach().cpu().numpy())" if type(array).__module__.startswith("torch") else ""
            return f"Scores.{name} is a {type(array).__module__}.{type(array).__name__}, not a numpy array{hint}"
        if array.ndim != 1:
            return f"Scores.{name} has shape {array.shape}, not one value per observation (1-D)"
    if not np.issubdtype(scores.values.dtype, np.floating):
        return f"Scores.values has dtype {scores.values.dtype}, not floating point"
    if not np.issubdtype(scores.groups.dtype, np.integer):
        return f"Scores.groups has dtype {scores.groups.dtype}, not integer"
    if len(scores.values) != len(scores.groups):
        return f"{len(scores.values)} values for {len(scores.groups)} groups"
    return None
