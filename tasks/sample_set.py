"""What every task shares: where S and the evaluation come from, and how large they are.

`SampleSetOptions` declares those options once (each task may change a default), and
`SampleSetTask` answers the interface from them: the task's M_k, which `manifold` draws
unless given another (what `cswap sweep` varies), and the seeded evaluation subset.
"""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cswap.errors import DataError
from cswap.interfaces import Task


class SampleSetOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples_per_class: int = Field(128, ge=2, description="M_k, samples of each class in S")
    manifold_split: str = Field("train", description="the split S is drawn from (never evaluated on)")
    eval_split: str = Field("test", description="the held-out split the metric is measured on")
    eval_limit: int | None = Field(None, ge=1, description="evaluate on a seeded subset of this size")
    batch_size: int = Field(256, ge=1, description="batch size of S and of the evaluation")
    validation_split: str | None = Field(
        None, description="a split held out for choosing how far to prune (a quality target, pruning.max_drop); "
        "default: drawn from manifold_split apart from S and the calibration data")

    @model_validator(mode="after")
    def _validation_is_not_evaluation(self):
        if self.validation_split is not None and self.validation_split == self.eval_split:
            raise ValueError(f"validation_split {self.validation_split!r} is the evaluation split: the data that "
                             "chooses how far to prune must never be the data that grades it")
        return self


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

    def validation_source(self) -> str:
        """The split validation data is drawn from: the declared one, else S's."""
        return self.options.validation_split or self.options.manifold_split

    def excluded_from_validation(self, size: int, avoid) -> np.ndarray:
        """A mask over the validation source's `size` samples: those of `avoid` (manifolds drawn
        from S's split, by their `indices`) when validation shares that split, and those the
        evaluation reads when it shares the evaluation split."""
        o, source = self.options, self.validation_source()
        excluded = np.zeros(size, dtype=bool)
        if source == o.manifold_split:
            for drawn in avoid:
                if drawn.indices is None:
                    raise DataError("validation data must stay apart from S and the calibration set, whose sample "
                                    "indices this task did not record")
                excluded[np.asarray(drawn.indices, dtype=np.int64)] = True
        if source == o.eval_split:
            excluded[self.eval_indices(size)] = True
        return excluded


def short_of(split: str, what: str, have: int, per_class: int, unit: str = "samples") -> DataError:
    """The refusal when a class has too few validation samples, with what to change."""
    return DataError(f"{what} has {have} {unit} in split {split!r} apart from S, the calibration data and the "
                     f"evaluation data, fewer than validation_per_class={per_class}; lower "
                     "pruning.validation_per_class, or give the task a validation_split")

