"""The five small interfaces the core is written against.

Everything task-, model- or method-specific lives behind one of these and is registered
through entry points (see `registry`). The core (`pruner`, `plan`, `cli`) imports only this
module, never a plugin module, which is what lets a new task or architecture be added as a
separate package.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from .plan import PruningPlan
    from .units import UnitGraph


@dataclass
class Scores:
    """Paired observations of the scoring function sigma for one network.

    `values[i]` is one observation and `groups[i]` the group it votes in (its class for
    classification; a class present in an image, or an image region, for segmentation).
    The layout depends only on the samples, never on the network, so the observations of the
    original and the intervened network pair up index by index.
    """

    values: np.ndarray  # float64, (n,)
    groups: np.ndarray  # int64, (n,)


class ScoringFunction(ABC):
    """sigma of Definition 1: how well the network does on each sample.

    Exists so the causal criterion is task-agnostic: classification uses the true-class
    probability, segmentation an IoU, detection a per-image match score.
    """

    higher_is_better: bool = True

    @abstractmethod
    def score(self, outputs, targets) -> Scores:
        """Observations for one batch of model outputs and their targets."""

    def differentiable(self, outputs, targets) -> torch.Tensor:
        """sigma of every sample as a tensor that gradients flow through (optional; used by
        the fast mode's Taylor screening). One value per sample, not per observation."""
        raise NotImplementedError(f"{type(self).__name__} has no differentiable form; Taylor screening needs one")


@dataclass
class Decision:
    """Verdict of the significance test for one unit (Definition 2)."""

    category: str  # "neutral" | "detrimental" | "critical"
    xi: float  # global causal effect (Definition 1 with the chosen effect measure)
    p_values: dict[int, float] = field(default_factory=dict)  # per voting group
    significant: list[int] = field(default_factory=list)  # groups whose predicate pi_k holds


class SignificanceTest(ABC):
    """Turns baseline and intervened scores into a category (Definitions 1 and 2).

    Exists so the statistics are swappable (voting rule, correction, effect measure) without
    touching the progressive pruner. Vectorised over units: `sigma_star` has one row per unit.
    """

    @abstractmethod
    def decide(self, sigma: np.ndarray, sigma_star: np.ndarray, groups: np.ndarray) -> list[Decision]:
        """One Decision per row of `sigma_star` (shape (units, n)); `sigma` has shape (n,)."""


class ArchitectureAdapter(ABC):
    """Knows one family of models: which units exist, what is never pruned, what to fix after.

    The default unit discovery runs torch-pruning's DependencyGraph (see `units.discover`);
    adapters add what tracing cannot know: heads to protect, attribute fixes after removal
    (ViT `num_heads`), and a chain of stages for the engine.
    """

    name: str = "adapter"
    #: `adapter: auto` tries adapters by descending priority; the generic one comes last.
    priority: int = 0

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter understands `model` (used by `adapter: auto`)."""

    def ignored_layers(self, model: nn.Module) -> list[nn.Module]:
        """Layers whose output channels are never pruned. Channels that reach the model's
        output are always protected by the core; list here what else must stay."""
        return []

    def units(self, model: nn.Module, example_inputs: torch.Tensor) -> "UnitGraph":
        """The model's pruning units, grouped in layers ordered from output to input."""
        from .units import discover

        return discover(model, example_inputs, ignored_layers=self.ignored_layers(model))

    def after_pruning(self, model: nn.Module) -> None:
        """Fix attributes that physical removal leaves stale (default: nothing)."""

    # Optional: `remove(self, model, units) -> None`. Define it when the adapter's units are not
    # torch-pruning groups (ViT heads); `PruningPlan.apply` then calls it instead of torch-pruning.

    def stages(self, model: nn.Module) -> Sequence[nn.Module] | None:
        """Modules whose sequential application equals `model.forward`, or None if unknown."""
        return None


@dataclass
class Manifold:
    """The sample set S: fixed batches of (inputs, targets), balanced over classes."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]
    class_counts: dict[int, int]

    def __len__(self) -> int:
        return sum(len(t) for _, t in self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.batches)

    def rebatched(self, batch_size: int) -> "Manifold":
        """The same samples in the same order, in batches of at most `batch_size` (targets must
        be tensors that concatenate along the first dimension)."""
        inputs = torch.cat([x for x, _ in self.batches])
        targets = torch.cat([y for _, y in self.batches])
        batches = [(inputs[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]
        return Manifold(batches, dict(self.class_counts))


class Task(ABC):
    """What the model is for: the sample set S, the evaluation metric, the default sigma.

    Exists so the same pruner serves classification, segmentation and detection.
    """

    default_scorer: str = "class_probability"
    default_test: str = "paired_t"
    metric: str = "accuracy"
    #: what the core does when S misses a class of `num_classes`: "error" (refuse) or "warn"
    missing_classes: str = "error"

    @property
    def num_classes(self) -> int | None:
        """How many classes (0..n-1) S must cover so every class the model predicts can
        vote; None (the default) when the groups are not classes, and nothing is checked.
        The core also counts the model's output width (dim 1), see `cswap.coverage`."""
        return None

    @abstractmethod
    def manifold(self, seed: int) -> Manifold:
        """S: `samples_per_class` samples per class, drawn with `seed`, separate from evaluation."""

    @abstractmethod
    def evaluate(self, model: nn.Module, device: torch.device | str = "cpu") -> dict[str, float]:
        """Metrics on the held-out split; must contain `self.metric`."""

    @abstractmethod
    def example_inputs(self) -> torch.Tensor:
        """A small input batch with the right shape, for tracing and FLOP counting."""


class Criterion(ABC):
    """A pruning criterion (C-SWAP or a baseline) that returns a removal order as a plan.

    Exists so every method is replayed and evaluated by the same code (`PruningPlan.apply`).
    """

    @abstractmethod
    def plan(self, model: nn.Module, units: "UnitGraph", task: Task, seed: int) -> "PruningPlan":
        """Score the units of `model` and return them ordered for removal."""
