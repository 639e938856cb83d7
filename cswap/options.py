"""The run's options, declared once: names, defaults, validation and documentation.

Two ideas, two models. `AnalysisOptions` is what Algorithm 1 reads (engine, intervention,
critical order, ...): the keyword arguments of `cswap.analyze`, `Analysis.options`. `Target`
is what turns a plan into a model (how far, at which widths, how repaired): what
`cswap.replay`, `plan.apply` and `save_pruned` take. A config's `pruning:` section holds both
side by side (`PruningOptions`). Adding an option is one field in the class it belongs to
(see docs/design.md, "Adding an option"); config validation, the API's keywords and the
documentation all come from the field's type, default and description.
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENGINES = ("auto", "staged", "delta", "full")
PRECISIONS = ("fp32", "tf32", "bf16")
INTERVENTIONS = ("zero", "mean", "least_squares")
RECOVERIES = ("bias", "bn", "least_squares")
CRITICAL_ORDERS = ("effect", "effect_per_param", "effect_per_param_thinning")
# Named starting points, as config overrides applied before the user's own (`--preset NAME`,
# `cswap.analyze(..., preset=NAME)`). The defaults are what benchmarks/recovery.py chose; `paper`
# is Algorithm 1 exactly as published: the relative effect, the zero cut, the critical tail by
# effect alone, nothing repaired after removal.
PRESETS = {
    "paper": {"test.options.effect": "relative", "test.options.neutral": "not_significant",
              "pruning.intervention": "zero", "pruning.critical_order": "effect", "pruning.recovery": "none"},
}


def preset_section(name: str, section: str) -> dict:
    """The options a preset gives one section of the config (`pruning`, `test.options`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return {k[len(section) + 1:]: v for k, v in PRESETS[name].items() if k.startswith(section + ".")}


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class FastOptions(_Options):
    """`pruning.fast`: opt-in shortcuts of Algorithm 1 (cswap/pruner/fast.py); all off is the
    paper's exact algorithm. Their plans may differ from the exact one."""

    group_testing: bool = Field(False, description="test blocks of units jointly, split blocks that are not neutral")
    group_size: int = Field(8, ge=2, description="first block size; later ones adapt to the neutral rate")
    group_accept: Literal["neutral", "non_critical"] = Field(
        "neutral", description="joint verdict that removes a block whole: neutral (the issue's rule), or "
        "non_critical (neutral or detrimental, as Algorithm 1 treats a single unit; an experiment: it lost "
        "23 SAUCE points on ResNet-20 in docs/results/performance.md)")
    max_group_size: int = Field(64, ge=2)
    sequential: bool = Field(False, description="stop a trial early once the unit is clearly critical")
    looks: int = Field(4, ge=2, le=64, description="parts of S after which the test is applied")
    interim_alpha: float = Field(0.001, gt=0, lt=1, description="significance level of the early looks")
    taylor_order: bool = Field(False, description="visit units by first-order |xi| estimate, smallest first")

    def accepts(self, category: str) -> bool:
        """Whether a block with this joint verdict is removed whole."""
        return category == "neutral" or (self.group_accept == "non_critical" and category == "detrimental")

    @property
    def enabled(self) -> bool:
        return self.group_testing or self.sequential or self.taylor_order


class RecoveryOptions(_Options):
    """`pruning.recovery`: repairs after removal, in closed form, on unlabeled calibration data
    (cswap/recovery.py). A plain string is the method: `pruning.recovery: least_squares+bn`."""

    method: str = Field("least_squares", description="none, or bias, bn, least_squares joined by '+' (applied in that "
                        "order): fold the removed units' mean into their readers' biases; re-estimate the "
                        "BatchNorm statistics; re-fit the readers' kept weights to the unpruned outputs")
    sequential: bool = Field(True, description="re-fit readers in network order, each on the inputs the repaired "
                             "layers before it give (false: every reader on the unrepaired model's inputs)")
    calibration_samples_per_class: int | None = Field(
        None, ge=1, description="calibration samples per class, drawn like S from the task's sample split (never "
        "the evaluation data); default: S itself")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value):
        return {"method": value} if isinstance(value, str) else value

    @field_validator("method")
    @classmethod
    def _known(cls, value: str) -> str:
        steps = [] if value == "none" else value.split("+")
        if any(s not in RECOVERIES for s in steps) or len(set(steps)) != len(steps):
            raise ValueError(f"recovery {value!r}: none, or {', '.join(RECOVERIES)} joined by '+', each at most once")
        return value

    @property
    def methods(self) -> tuple[str, ...]:
        return () if self.method == "none" else tuple(self.method.split("+"))


class MinWidth(_Options):
    """`pruning.min_width`: the narrowest a per-parameter tail order may leave a bottleneck layer
    (one every path from input to output crosses) before every other unit is taken, because no
    repair widens a one-channel bottleneck again (issue #27). `none` is the plan's own rule: a
    layer keeps one unit. A replay past a floor says so (cswap/tail_order.py, cswap/collapse.py)."""

    share: float = Field(0.25, ge=0, le=1, description="share of the layer's unpruned width, rounded up")
    minimum: int = Field(2, ge=1, description="units kept at least (never more than the layer has)")

    @model_validator(mode="before")
    @classmethod
    def _none(cls, value):
        return {"share": 0.0, "minimum": 1} if value in ("none", None) else value

    @property
    def trivial(self) -> bool:
        return self.share == 0 and self.minimum == 1

    def of(self, width: int) -> int:
        """The floor of a layer `width` units wide (round-off of share * width ignored)."""
        return min(width, max(self.minimum, math.ceil(round(self.share * width, 9))))


class AnalysisOptions(_Options):
    """What Algorithm 1 reads: how C-SWAP (and the causal baselines) walk the network and what a
    cut leaves behind. The plan an analysis makes depends on these and on nothing in `Target`."""

    shuffle_units: bool = Field(True, description="visit the units of a layer in a seeded random order")
    engine: Literal[ENGINES] = Field(
        "auto", description="staged: re-run only what a cut changes (bitwise the same scores); delta: "
        "also update the first reader by the cut's rank-one share (round-off differences); full: "
        "whole forward per unit; auto: staged where the adapter has a stage chain")
    unit_batch: int | Literal["auto"] = Field(
        1, description="units evaluated per pass on a batch that many times larger, speculatively (the same "
        "plan); auto: from free GPU memory on CUDA, 1 on CPU (no gain there)")
    precision: Literal[PRECISIONS] = Field(
        "fp32", description="arithmetic of the trials only (cswap/precision.py): fp32 (exact, the default); tf32 "
        "(TF32 matmuls and convolutions, CUDA only); bf16 (autocast). The baseline sigma, the cache of the network "
        "and every reported number stay fp32; each trial is compared with the uncut network run the same way. "
        "Opt-in and approximate: the plan may differ (measured in docs/results/performance.md)")
    fast: FastOptions = Field(FastOptions(), description="opt-in shortcuts (cswap/pruner/fast.py); the plan may differ")
    verify_units: bool = Field(True, description="check every layer's cut against its physical removal before the "
                               "analysis and leave out layers where they differ (cswap/verify.py)")
    intervention: Literal[INTERVENTIONS] = Field(
        "zero", description="what a cut leaves at the unit's readers, and so what the test judges: nothing (zero, "
        "the paper), the unit's mean over S (mean), or the least-squares correction of the readers' other weights "
        "(least_squares); removal applies the same compensation (cswap/compensation.py)")
    critical_order: Literal[CRITICAL_ORDERS] = Field(
        "effect_per_param", description="the order in which a target beyond the removable units takes the kept "
        "(critical) ones: least harmful first (effect, the paper), least harm per parameter freed (effect_per_param), "
        "or that with a bottleneck's harms grown as it thins (effect_per_param_thinning); chosen in "
        "docs/results/tail_order.md (cswap/tail_order.py)")
    min_width: MinWidth = Field(MinWidth(), description="the floor of each bottleneck layer in the per-parameter "
                                "tail orders (share, minimum; none: one unit; effect, the paper's order, has none)")
    ridge: float = Field(1e-3, gt=0, description="ridge of every least-squares solve (the compensated cut and the "
                         "recovery of its replay), relative to the mean diagonal of the Gram matrix")

    @model_validator(mode="after")
    def _exact_trials(self):
        if self.unit_batch != "auto" and self.unit_batch < 1:
            raise ValueError("unit_batch must be at least 1 or 'auto'")
        if self.fast.enabled and self.unit_batch not in (1, "auto"):
            raise ValueError("unit_batch batches exact single-unit trials; it cannot be combined with fast")
        if self.precision != "fp32" and self.fast.enabled:
            raise ValueError("reduced precision (precision) applies to exact single-unit trials; it cannot be "
                             "combined with fast")
        if self.intervention != "zero" and self.engine == "delta":
            raise ValueError("engine delta updates the first reader by the cut's share alone; a compensated cut "
                             f"(intervention {self.intervention}) changes more: use engine staged or auto")
        return self


# A target kind -> the fields that set it: one kind per target ("one target only", checked once,
# in `Target`). A quality target is set by either of its bounds, or both.
TARGET_KINDS = {"params_ratio": ("params_ratio",), "flops_ratio": ("flops_ratio",),
                "latency_ratio": ("latency_ratio",), "quality": ("max_drop", "max_class_drop")}
KIND_FIELDS = tuple(f for fields in TARGET_KINDS.values() for f in fields)
PREFERENCES = ("smallest", "fastest")


class Target(_Options):
    """What turns a plan into a model (cswap/replay.py): how far to prune, at which widths, and
    how to repair. No field changes the analysis, so one plan serves every target; the target
    is saved with the pruned model (`pruned.json`) so it can be rebuilt exactly."""

    params_ratio: float | None = Field(None, ge=0, le=1, description="target share of parameters to remove")
    flops_ratio: float | None = Field(None, ge=0, le=1, description="target share of MACs to remove")
    latency_ratio: float | None = Field(
        None, gt=1, description="target speed-up, original over pruned latency measured on this device "
        "(e.g. 1.5 for 1.5x faster; cswap/latency.py: a per-layer latency table, then a real measurement)")
    latency_batch: int = Field(1, ge=1, description="batch size at which latency_ratio is measured")
    round_to: int | None = Field(
        None, ge=1, description="keep every pruned layer's width a multiple of this (e.g. 8), holding back "
        "or bringing forward the last units of a layer in the plan's order (cswap/alignment.py)")
    recovery: RecoveryOptions = Field(RecoveryOptions(), description="repairs after removal (cswap/recovery.py)")
    max_drop: float | None = Field(
        None, ge=0, le=100, description="quality target: the most the task's metric may drop, in points (1 = one "
        "point of accuracy or mIoU), as an upper confidence bound on held-out validation data (cswap/quality.py); "
        "the largest prefix of the plan that meets it is kept")
    max_class_drop: float | None = Field(
        None, ge=0, le=100, description="quality target: the most any one class's metric may drop, in points, as "
        "an upper confidence bound per class (each class's own bound at `confidence`)")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="one-sided confidence of the quality target's bounds")
    prefer: Literal[PREFERENCES] = Field(
        "smallest", description="among the prefixes a quality search found to meet its target: the largest "
        "(smallest model), or the fastest as measured (in turns, at latency_batch, on this device)")
    validation_per_class: int = Field(
        300, ge=1, description="samples of each class the quality target is checked on, drawn apart from S, the "
        "calibration data and the evaluation split (Task.validation); at 300 a prefix that changes no answer "
        "bounds a class's drop below 1.3 points and, over 10 classes, the whole drop below 0.13")

    @model_validator(mode="after")
    def _one_target(self):
        given = [[f for f in fields if getattr(self, f) is not None] for fields in TARGET_KINDS.values()]
        if sum(1 for g in given if g) > 1:
            raise ValueError(f"give one target, not {' and '.join('/'.join(g) for g in given if g)}")
        return self

    @property
    def kind(self) -> str | None:
        """Which of `TARGET_KINDS` is set; None: the non-critical units only (the paper's C-SWAP)."""
        return next((n for n, fields in TARGET_KINDS.items() if any(getattr(self, f) is not None for f in fields)),
                    None)

    def describe(self) -> str:
        """The target in words, for summaries (`params_ratio 0.5`, `max_drop 1 pt, max_class_drop 5 pt at 95 %`)."""
        if self.kind is None:
            return "the non-critical units"
        if self.kind != "quality":
            return f"{self.kind} {getattr(self, self.kind)}"
        bounds = [f"{n} {getattr(self, n):g} pt" for n in TARGET_KINDS["quality"] if getattr(self, n) is not None]
        return f"{', '.join(bounds)} at {self.confidence:.0%} confidence"

    def to(self, **changes) -> "Target":
        """This target with other settings, validated (`to(params_ratio=0.3)` replaces the kind)."""
        data = self.model_dump()
        named = {n for n, fields in TARGET_KINDS.items() if any(f in changes for f in fields)}
        if named and named != {self.kind}:
            data.update(dict.fromkeys(KIND_FIELDS))
        return Target(**{**data, **changes})


def check_recovery_fits(intervention: str, recovery: RecoveryOptions) -> None:
    """Refuse a recovery that repeats what a compensated cut already did (ValueError)."""
    if intervention != "zero" and "bias" in recovery.methods:
        raise ValueError(f"recovery bias folds the removed units' means, which intervention {intervention} "
                         "already does; use least_squares or bn")


class PruningOptions(Target, AnalysisOptions):
    """The config's `pruning:` section: the analysis options and the target side by side, so a
    config reads as one section (`pruning.engine`, `pruning.params_ratio`). The run hands
    `analysis` to Algorithm 1 and `target` to the replay; each field is declared once, in its
    own class."""

    @classmethod
    def preset(cls, name: str, **options) -> "PruningOptions":
        """The pruning options of a named preset (`PRESETS`), with `options` on top (its test
        options: `preset_section(name, "test.options")`, or `cswap.analyze(..., preset=name)`)."""
        return cls(**{**preset_section(name, "pruning"), **options})

    @model_validator(mode="after")
    def _recovery_fits(self):
        check_recovery_fits(self.intervention, self.recovery)  # refused when read, not after the analysis
        return self

    @property
    def analysis(self) -> AnalysisOptions:
        return AnalysisOptions(**{n: getattr(self, n) for n in AnalysisOptions.model_fields})

    @property
    def target(self) -> Target:
        return Target(**{n: getattr(self, n) for n in Target.model_fields})
