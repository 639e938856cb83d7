"""The interfaces the core is written against, and the data types that cross them.

Everything task-, model- or method-specific lives behind one of five interfaces and is
registered through entry points (`cswap.registry`): `Task`, `ScoringFunction`,
`SignificanceTest`, `ArchitectureAdapter`, `Criterion`. This module is the ground floor: it
imports nothing from `cswap`, so a plugin that imports it gets the contract and nothing
else, and the core above it never imports a plugin module.

Optional capabilities are declared here, as attributes or as methods with a default (the
way torchmetrics declares `is_differentiable`); the core reads the declaration and never
probes a plugin with getattr, hasattr or exceptions. Every plugin is constructed by the
registry as `cls(options)` with its validated `Options` (see `Configurable`); criteria get
the run's objects through `Criterion.rank(analysis, seed)`. The contract for writing each
kind of plugin is in docs/design.md.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch
from torch import nn

# ---- data types -------------------------------------------------------------------------

NEUTRAL, DETRIMENTAL, CRITICAL = "neutral", "detrimental", "critical"
#: neither significant nor shown harmless (a test that asks for equivalence, e.g. paired_t with
#: `neutral: equivalent`): the test could not judge the unit, so Algorithm 1 keeps it, in the
#: kept tail with the critical units
INCONCLUSIVE = "inconclusive"


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


@dataclass
class Decision:
    """Verdict of the significance test for one unit (Definition 2)."""

    category: str  # NEUTRAL | DETRIMENTAL | CRITICAL | INCONCLUSIVE (kept like CRITICAL)
    xi: float  # global causal effect (Definition 1 with the chosen effect measure)
    p_values: dict[int, float] = field(default_factory=dict)  # per voting group
    significant: list[int] = field(default_factory=list)  # groups whose predicate pi_k holds


@dataclass
class Manifold:
    """The sample set S: fixed batches of (inputs, targets), balanced over classes."""

    batches: list[tuple[torch.Tensor, Any]]
    class_counts: dict[int, int]
    #: where each sample (in batch order) sits in the split it was drawn from, when the task
    #: records it: what lets `Task.validation` keep apart from S and the calibration set
    indices: np.ndarray | None = None

    def __len__(self) -> int:
        return sum(len(t) for _, t in self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        return iter(self.batches)

    def to(self, device) -> "Manifold":
        """The same samples with every tensor on `device` (other targets as they are)."""
        return Manifold([(x.to(device), y.to(device) if torch.is_tensor(y) else y) for x, y in self.batches],
                        dict(self.class_counts), self.indices)

    def rebatched(self, batch_size: int) -> "Manifold":
        """The same samples in the same order, in batches of at most `batch_size` (targets must
        be tensors that concatenate along the first dimension)."""
        inputs = torch.cat([x for x, _ in self.batches])
        targets = torch.cat([y for _, y in self.batches])
        batches = [(inputs[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]
        return Manifold(batches, dict(self.class_counts), self.indices)


@dataclass
class Outcomes:
    """A task's metric taken apart sample by sample, so two models can be compared on the same
    samples (a paired drop) and the samples resampled (a bootstrap): `cswap.quality`.

    Two shapes. A mean: `values` (n,) per sample, the metric is their mean (1 for a right
    answer, 0 for a wrong one: accuracy), `classes` (n,) each sample's class (None: the task
    has no per-class metric), a class's metric the mean over its samples. A ratio of sums per
    class: `values` and `totals` (n, C), class c's metric sum_i values[i, c] / sum_i totals[i, c],
    the metric the mean over the classes with a non-zero total (mIoU from per-image
    intersections and unions)."""

    values: np.ndarray
    classes: np.ndarray | None = None
    totals: np.ndarray | None = None
    names: list[str] | None = None  # class names, where the data names its classes

    def __len__(self) -> int:
        return len(self.values)

    @property
    def binary(self) -> bool:
        """A mean of outcomes that are each 0 or 1 (what an exact binomial bound needs)."""
        return self.totals is None and bool(np.isin(self.values, (0.0, 1.0)).all())

    @property
    def has_classes(self) -> bool:
        return self.totals is not None or self.classes is not None

    @property
    def num_classes(self) -> int:
        if self.totals is not None:
            return self.totals.shape[1]
        return int(self.classes.max()) + 1 if self.classes is not None and len(self.classes) else 0

    def resampled(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The metric and every class's metric (NaN where a class has no sample) under each row
        of `weights` (B, n): how often each sample is counted (a bootstrap resample; ones: as
        measured). Returns arrays of shape (B,) and (B, C) (None without classes)."""
        weights = np.asarray(weights, dtype=np.float64)
        if self.totals is None:
            metric = weights @ self.values / weights.sum(1)
            if self.classes is None:
                return metric, None
            onehot = np.eye(self.num_classes)[self.classes]
            with np.errstate(invalid="ignore", divide="ignore"):
                per_class = (weights @ (onehot * self.values[:, None])) / (weights @ onehot)
            return metric, per_class
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = (weights @ self.values) / (weights @ self.totals)
        present = np.isfinite(per_class)
        metric = np.where(present, per_class, 0.0).sum(1) / np.maximum(present.sum(1), 1)
        return metric, per_class

    def metric(self) -> float:
        return float(self.resampled(np.ones((1, len(self))))[0][0])

    def per_class(self) -> np.ndarray | None:
        """Every class's metric as measured (NaN where a class has no sample); None without classes."""
        if self.totals is None and self.classes is not None:  # without a (n, C) matrix: many classes stay cheap
            counts = np.bincount(self.classes, minlength=self.num_classes)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.bincount(self.classes, self.values, minlength=self.num_classes) / counts
        per_class = self.resampled(np.ones((1, len(self))))[1]
        return None if per_class is None else per_class[0]

    def class_samples(self) -> np.ndarray | None:
        """Samples that measure each class: its samples (a mean), the samples where its total is
        not zero (a ratio: the images where the class is seen or predicted)."""
        if self.totals is not None:
            return (self.totals > 0).sum(0)
        return None if self.classes is None else np.bincount(self.classes, minlength=self.num_classes)


@dataclass(frozen=True, order=True)
class Unit:
    """One channel of a layer (a dependency group, an attention module, an MLP), named by the
    layer's root module."""

    layer: str
    channel: int

    def __str__(self) -> str:
        return f"{self.layer}:{self.channel}"

    @classmethod
    def parse(cls, text: str) -> "Unit":
        layer, _, channel = text.rpartition(":")
        return cls(layer, int(channel))


@dataclass
class Layer:
    """Coupled channels that are pruned together, who reads them, and what removing one frees."""

    name: str  # root module name: stable across copies of the same architecture
    channels: int
    position: int  # execution index of its last producer: larger is nearer the output
    modules: list[str]
    # consumer weight slices: (parameter name, dim, per-channel indices in that parameter)
    reads: list[tuple[str, int, list[list[int]]]] = field(default_factory=list)
    # every parameter slice that physical removal deletes: (parameter name, dim, per-channel count)
    frees: list[tuple[str, int, list[int]]] = field(default_factory=list)

    def units(self) -> list[Unit]:
        return [Unit(self.name, c) for c in range(self.channels)]

    @staticmethod
    def module_of(parameter: str) -> str:
        """The module a parameter name belongs to (`layer1.0.conv1.weight` -> `layer1.0.conv1`)."""
        return parameter.rpartition(".")[0]

    def readers(self, input_dim_only: bool = False) -> list[str]:
        """The modules that read this layer's channels, in `reads` order, each once; with
        `input_dim_only`, those that read them along their weight's input dimension (dim 1)."""
        return list(dict.fromkeys(self.module_of(p) for p, dim, _ in self.reads if dim == 1 or not input_dim_only))


@dataclass
class UnitGraph:
    """The prunable layers of a model, ordered from output to input, plus those left out."""

    layers: list[Layer]
    skipped: dict[str, str]  # layer name -> why it is not prunable
    input_shape: tuple[int, ...]
    # layers kept although their cut could not be checked against removal (see cswap.verify)
    unverified: dict[str, str] = field(default_factory=dict)

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no prunable layer {name!r}")

    @property
    def num_units(self) -> int:
        return sum(layer.channels for layer in self.layers)


PROGRESSIVE = "progressive"  # removed during the analysis (neutral or detrimental)
CRITICAL_RANKED = "critical"  # kept units (critical, inconclusive), in `critical_order`, only for a target
RANKED = "ranked"  # a baseline criterion's global ranking


@dataclass
class PlanStep:
    """One unit of a removal order, with what its criterion knows of it."""

    unit: Unit
    phase: str  # PROGRESSIVE | CRITICAL_RANKED | RANKED
    category: str | None = None
    xi: float | None = None
    score: float | None = None
    p_values: dict[int, float] = field(default_factory=dict)
    params_freed: int = 0  # counted on the real model's shapes by cswap.plan.PruningPlan.build

    def to_json(self) -> dict:
        d = asdict(self)
        d["unit"] = str(self.unit)
        d["p_values"] = {str(k): v for k, v in self.p_values.items()}
        return {k: v for k, v in d.items() if v is not None and v != {}}

    @classmethod
    def from_json(cls, d: dict) -> "PlanStep":
        d = dict(d)
        d["unit"] = Unit.parse(d["unit"])
        d["p_values"] = {int(k): float(v) for k, v in d.get("p_values", {}).items()}
        return cls(**d)


@dataclass
class Ranking:
    """What a criterion returns: the units in removal order. The core counts each step's
    parameter cost on the real model and makes the replayable plan from it.

    The typed fields are what a replay must repeat: the sample set S the criterion measured
    on (drawn by `seed`, `samples_per_class` per class; the calibration data of a recovery
    comes from there too) and how it cut a unit (`intervention`, with the `ridge` of its least
    squares), since a compensated cut is replayed with the same compensation. `meta` is
    description only (counts, options, timings)."""

    method: str
    steps: list[PlanStep]
    meta: dict = field(default_factory=dict)
    protected: dict[str, str] = field(default_factory=dict)  # unit -> why it is never removed
    seed: int | None = None
    samples_per_class: int | None = None  # M_k of S; None: the task's own
    intervention: str = "zero"
    ridge: float | None = None  # of a least-squares or mean intervention; None for the zero cut


# ---- the interfaces -----------------------------------------------------------------------

class Configurable:
    """A plugin built from validated options.

    `Options` is a pydantic model (declare it with `extra="forbid"`, so a mistyped option is
    an error naming the field) and `self.options` its instance; the registry constructs every
    plugin as `cls(options)`. A plugin without options leaves `Options` as None.
    """

    Options: ClassVar[type | None] = None
    #: modules the plugin imports only when it runs (an optional extra, e.g. ("captum",)): the
    #: registry checks they are importable before building it and names the extra to install
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options=None):
        if options is None and self.Options is not None:
            options = self.Options()
        self.options = options


class ScoringFunction(Configurable, ABC):
    """sigma of Definition 1: how well the network does on each sample.

    Exists so the causal criterion is task-agnostic: classification uses the true-class
    probability, segmentation an IoU, detection a per-image match score.

    The contract (docs/design.md, section 5), which the core checks on every batch of S
    (`cswap.contract.check_scores`) and honours in the test (`SignificanceTest.for_scorer`):

    - built as `cls(options)`, `options` an instance of the class's `Options` (or no argument
      when it declares none); nothing else reaches the constructor;
    - `score(outputs, targets)` gets what the model returns for one batch of S, unchanged
      (a tensor such as logits (N, C) or (N, C, H, W), or the model's tuple), computed under
      `torch.no_grad` on the analysis device, and the batch's targets as the task made them
      (on that device when they are tensors);
    - it returns `Scores` of numpy arrays on the host: `values` 1-D floating point (float64
      preferred), `groups` 1-D integer, of one length; torch tensors are refused (a device
      tensor cannot become numpy silently, and a tensor kept on the device would hold its
      memory). The layout (which observation is which) may depend on the targets only;
    - `higher_is_better` and `positive` are promises the core acts on: a lower-is-better
      score reverses the effect's sign (xi > 0 still means the cut helped), and an effect
      that divides by sigma (the paper's relative effect) is refused for a scorer that does
      not promise sigma > 0, or whose baseline sigma is not.
    """

    #: whether a larger sigma is a better network (a probability, an IoU); False for a loss or
    #: an energy: the significance test then reverses the sign of every effect
    higher_is_better: bool = True
    #: whether every value is > 0: True (promised), False (values can be <= 0, e.g. a margin or
    #: a log-probability: effects that divide by sigma are refused at once), None (not
    #: declared: the baseline sigma is checked before any such effect is computed)
    positive: bool | None = None
    #: whether `differentiable` is implemented (the fast mode's Taylor screening needs it)
    is_differentiable: bool = False

    @abstractmethod
    def score(self, outputs, targets) -> Scores:
        """Observations for one batch of model outputs and their targets (see the class
        docstring for the types)."""

    def differentiable(self, outputs, targets) -> torch.Tensor:
        """sigma of every sample as a tensor that gradients flow through, one value per
        sample (not per observation). Only called when `is_differentiable`."""
        raise NotImplementedError(f"{type(self).__name__} declares no differentiable form")


class SignificanceTest(Configurable, ABC):
    """Turns baseline and intervened scores into a category (Definitions 1 and 2).

    Exists so the statistics are swappable (voting rule, correction, effect measure) without
    touching the progressive pruner. Vectorised over units: `sigma_star` has one row per unit.
    """

    @property
    @abstractmethod
    def alpha(self) -> float:
        """The significance level of each test (what a sweep varies, what early looks tighten)."""

    @abstractmethod
    def with_alpha(self, alpha: float) -> "SignificanceTest":
        """The same test at another significance level, validated as the test's own `Options`
        validate it (a level outside (0, 1) is a `ConfigError`, one line): every entry point
        that sets alpha (config, `cswap sweep --alpha`, `cswap.analyze(alpha=...)`) goes
        through here."""

    @abstractmethod
    def effect(self, sigma: np.ndarray, sigma_star: np.ndarray) -> np.ndarray:
        """The effect of the intervention on each observation; its mean is the unit's xi."""

    @property
    def relative_effect(self) -> bool:
        """Whether xi measures relative changes of sigma (d sigma / sigma) rather than absolute
        ones; first-order (Taylor) screening weighs its gradients by it."""
        return True

    @property
    def verdict_by_sign(self) -> bool:
        """Whether a significant unit's category is the sign of xi over all of S (Definition 2);
        an early stop on part of S then also needs xi itself clearly below zero."""
        return True

    def for_scorer(self, scorer: "ScoringFunction") -> "SignificanceTest":
        """This test as it applies to `scorer`'s observations: effects and verdicts follow the
        scorer's `higher_is_better`, and an effect that divides by sigma is refused unless
        sigma is positive. `Analysis` calls it once, so every decision of an analysis uses
        it; a copy made by `with_alpha` keeps it. The default takes higher-is-better scores
        only."""
        if not scorer.higher_is_better:
            raise NotImplementedError(f"{type(self).__name__} does not handle a lower-is-better scoring function "
                                      f"({type(scorer).__name__})")
        return self

    @abstractmethod
    def decide(self, sigma: np.ndarray, sigma_star: np.ndarray, groups: np.ndarray) -> list[Decision]:
        """One Decision per row of `sigma_star` (shape (units, n)); `sigma` has shape (n,)."""


class ArchitectureAdapter(Configurable, ABC):
    """Knows one family of models: which units exist, what is never pruned, what to fix after.

    Every method has a default that hands the work to the core: units are torch-pruning's
    dependency groups (`cswap.discovery`), removal is torch-pruning's, nothing needs fixing,
    and there is no stage chain. Adapters add what tracing cannot know: heads to protect,
    units that are not channel groups (ViT heads) and their removal, attribute fixes after
    removal (`num_heads`), and a chain of stages for the engine.
    """

    name: str = "adapter"
    #: `adapter: auto` tries adapters by descending priority; the generic one comes last.
    priority: int = 0
    #: whether `remove` removes this adapter's units itself (units that are not channels of a
    #: torch-pruning group, e.g. ViT heads); otherwise the core removes them with torch-pruning
    removes_units: bool = False

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter understands `model` (used by `adapter: auto`)."""

    def ignored_layers(self, model: nn.Module) -> list[nn.Module]:
        """Layers whose output channels are never pruned. Channels that reach the model's
        output are always protected by the core; list here what else must stay."""
        return []

    def units(self, model: nn.Module, example_inputs: torch.Tensor) -> UnitGraph | None:
        """The model's pruning units, in layers ordered from output to input; None lets the
        core find torch-pruning's dependency groups, leaving out `ignored_layers`."""
        return None

    def remove(self, model: nn.Module, units: Sequence[Unit]) -> None:
        """Physically remove `units` (numbered as on the unpruned model) in place. Only called
        when `removes_units` is declared."""
        raise NotImplementedError(f"{type(self).__name__} declares no removal of its own")

    def after_pruning(self, model: nn.Module) -> None:
        """Fix attributes that physical removal leaves stale (default: nothing)."""

    def stages(self, model: nn.Module) -> Sequence[nn.Module] | None:
        """Modules whose sequential application equals `model.forward`, or None if unknown."""
        return None


class Task(Configurable, ABC):
    """What the model is for: the sample set S, the evaluation metric, the default sigma.

    Exists so the same pruner serves classification, segmentation and detection.
    """

    default_scorer: str = "class_probability"
    default_test: str = "paired_t"
    metric: str = "accuracy"
    #: what the core does when S misses a class of `num_classes`: "error" (refuse) or "warn"
    missing_classes: str = "error"
    #: whether `from_tensors` builds this task over in-memory data (`cswap.analyze(model, (x, y))`)
    accepts_tensors: bool = False
    #: whether `validation` and `outcomes` are implemented: a quality target (`pruning.max_drop`)
    #: is checked with them, and refused on a task that declares none
    measures_outcomes: bool = False
    #: whether the outcomes carry a per-class metric (`pruning.max_class_drop` needs one)
    per_class_metric: bool = False

    @property
    def num_classes(self) -> int | None:
        """How many classes (0..n-1) S must cover so every class the model predicts can
        vote; None (the default) when the groups are not classes, and nothing is checked.
        The core also counts the model's output width (dim 1), see `cswap.coverage`."""
        return None

    @property
    def samples_per_class(self) -> int | None:
        """The task's own M_k (what `manifold` draws when it is not given one), if it has one."""
        return None

    def bind_model(self, model: nn.Module) -> None:
        """Called by the core with the model the task will serve, after the model is built and
        before S is drawn (default: nothing). A task whose inputs depend on the model reads
        it here: the segmentation task takes the mmseg model's input normalisation, so the
        mmseg config is named once (`model.kwargs.config`)."""

    @abstractmethod
    def manifold(self, seed: int, samples_per_class: int | None = None) -> Manifold:
        """S: `samples_per_class` (default: the task's own M_k) samples per class, drawn with
        `seed`, never from the evaluation data."""

    @abstractmethod
    def evaluate(self, model: nn.Module, device: torch.device | str = "cpu") -> dict[str, float]:
        """Metrics on the held-out split; must contain `self.metric`."""

    @abstractmethod
    def example_inputs(self) -> torch.Tensor:
        """A small input batch with the right shape, for tracing and FLOP counting."""

    def validation(self, seed: int, avoid: Sequence[Manifold], per_class: int) -> Manifold:
        """Samples a quality target is checked on: `per_class` of every class (as `manifold`
        counts them), drawn with `seed`, from the sample split without any sample of `avoid`
        (S and the calibration set, by their `indices`) or from a split the task declares for
        it; never a sample the evaluation reads. Only called when `measures_outcomes`."""
        raise NotImplementedError(f"{type(self).__name__} declares no validation data")

    def outcomes(self, model: nn.Module, device: torch.device | str = "cpu",
                 samples: Manifold | None = None) -> Outcomes:
        """What the metric is made of, per sample, on `samples` (validation data), or on the
        evaluation split when None (then `outcomes(...).metric()` is `evaluate(...)[metric]`).
        Only called when `measures_outcomes`."""
        raise NotImplementedError(f"{type(self).__name__} declares no per-sample outcomes")

    @classmethod
    def from_tensors(cls, inputs: torch.Tensor, targets: torch.Tensor, samples_per_class: int) -> "Task":
        """The task over in-memory data, S and evaluation both drawn from it. Only called when
        `accepts_tensors`."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from tensors")


@dataclass
class Analysis:
    """What every criterion and seed of one model's analysis shares, built once (from a config
    by `cswap.build`, or by `cswap.analyze`): the model, its units, the task, sigma, the test,
    the adapter, the device and the analysis options (a `cswap.options.AnalysisOptions`)."""

    model: nn.Module
    units: UnitGraph
    task: Task
    scorer: ScoringFunction
    test: SignificanceTest
    adapter: ArchitectureAdapter
    adapter_name: str
    device: torch.device
    options: Any
    progress: bool = False
    example_inputs: torch.Tensor | None = None  # a small batch of the task's inputs (the task's own by default)

    def __post_init__(self):
        if self.example_inputs is None:
            self.example_inputs = self.task.example_inputs()
        # the scorer's declared direction and range reach every decision of the analysis
        # (also of a copy made by dataclasses.replace with another test)
        self.test = self.test.for_scorer(self.scorer)


class Criterion(Configurable, ABC):
    """A pruning criterion (C-SWAP or a baseline) that returns a removal order.

    Exists so every method is replayed and evaluated by the same code (`PruningPlan.apply`).
    """

    @abstractmethod
    def rank(self, analysis: Analysis, seed: int) -> Ranking:
        """Score the units of `analysis.model` (never changing it) and order them for removal."""
