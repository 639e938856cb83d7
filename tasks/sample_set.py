"""What every task shares: where S and the evaluation come from, and how large they are.

`SampleSetOptions` declares those options once (each task may change a default), and
`SampleSetTask` answers the interface from them: the task's M_k, which `manifold` draws
unless given another (what `cswap sweep` varies), and the seeded evaluation subset.
"""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cswap.interfaces import Task


class SampleSetOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples_per_class: int = Field(128, ge=2, description="M_k, samples of each class in S")
    manifold_split: str = Field("train", description="the split S is drawn from (never evaluated on)")
    eval_split: str = Field("test", description="the held-out split the metric is measured on")
    eval_limit: int | None = Field(None, ge=1, description="evaluate on a seeded subset of this size")
    batch_size: int = Field(256, ge=1, description="batch size of S and of the evaluation")


class SampleSetTask(Task):
    """A task whose options extend `SampleSetOptions`."""

    @property
    def samples_per_class(self) -> int:
        return self.options.samples_per_class

    def per_class(self, samples_per_class: int | None) -> int:
        """The M_k to draw: the one asked for, else the task's own."""
        return self.options.samples_per_class if samples_per_class is None else samples_per_class

    def eval_indices(self, n: int) -> np.ndarray:
        """All `n` evaluation items, or a seeded subset of `eval_limit` of them (the same on
        every call, so every model of a curve is graded on the same items)."""
        limit = self.options.eval_limit
        if limit and limit < n:
            return np.sort(np.random.default_rng(0).choice(n, limit, replace=False))
        return np.arange(n)
