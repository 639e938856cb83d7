"""The run's pruning options, declared once: names, defaults, validation and documentation.

`PruningOptions` is the `pruning:` section of a run config, the keyword arguments of
`cswap.analyze`, and what the pruner and the causal criteria (C-SWAP, C-BP, AMP) read; no
other module declares one of these options again. Adding an option is one field here (see
docs/design.md, "Adding an option"): config validation, the API's keywords and the
documentation all come from the field's type, default and description.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENGINES = ("auto", "staged", "delta", "full")
PRECISIONS = ("fp32", "tf32", "bf16")
INTERVENTIONS = ("zero", "mean", "least_squares")
RECOVERIES = ("bias", "bn", "least_squares")
CRITICAL_ORDERS = ("effect", "effect_per_param")
# Named starting points, as config overrides applied before the user's own (`--preset NAME`,
# `cswap.analyze(..., preset=NAME)`). The defaults are what benchmarks/recovery.py chose; `paper`
# is Algorithm 1 exactly as published: the relative effect, the zero cut, the critical tail by
# effect alone, nothing repaired after removal.
PRESETS = {
    "paper": {"test.options.effect": "relative", "pruning.intervention": "zero", "pruning.critical_order": "effect",
              "pruning.recovery": "none"},
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


class PruningOptions(_Options):
    """How C-SWAP (and the causal baselines) walk the network, and what the plan is replayed to."""

    params_ratio: float | None = Field(None, ge=0, le=1, description="target share of parameters to remove")
    flops_ratio: float | None = Field(None, ge=0, le=1, description="target share of MACs to remove")
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
    round_to: int | None = Field(
        None, ge=1, description="replay: keep every pruned layer's width a multiple of this (e.g. 8), holding back "
        "or bringing forward the last units of a layer in the plan's order (cswap/alignment.py)")
    latency_ratio: float | None = Field(
        None, gt=1, description="replay: target speed-up, original over pruned latency measured on this device "
        "(e.g. 1.5 for 1.5x faster; cswap/latency.py: a per-layer latency table, then a real measurement)")
    latency_batch: int = Field(1, ge=1, description="batch size at which latency_ratio is measured")
    fast: FastOptions = Field(FastOptions(), description="opt-in shortcuts (cswap/pruner/fast.py); the plan may differ")
    verify_units: bool = Field(True, description="check every layer's cut against its physical removal before the "
                               "analysis and leave out layers where they differ (cswap/verify.py)")
    intervention: Literal[INTERVENTIONS] = Field(
        "zero", description="what a cut leaves at the unit's readers, and so what the test judges: nothing (zero, "
        "the paper), the unit's mean over S (mean), or the least-squares correction of the readers' other weights "
        "(least_squares); removal applies the same compensation (cswap/compensation.py)")
    critical_order: Literal[CRITICAL_ORDERS] = Field(
        "effect_per_param", description="the order in which a target beyond the removable units takes the kept "
        "(critical) ones: least harmful first (effect, the paper), or least harm per parameter freed "
        "(effect_per_param; cswap/tail_order.py)")
    recovery: RecoveryOptions = Field(RecoveryOptions(), description="repairs after removal (cswap/recovery.py)")
    ridge: float = Field(1e-3, gt=0, description="ridge of every least-squares solve (intervention and recovery), "
                         "relative to the mean diagonal of the Gram matrix")

    @classmethod
    def preset(cls, name: str, **options) -> "PruningOptions":
        """The pruning options of a named preset (`PRESETS`), with `options` on top (its test
        options: `preset_section(name, "test.options")`, or `cswap.analyze(..., preset=name)`)."""
        return cls(**{**preset_section(name, "pruning"), **options})

    @model_validator(mode="after")
    def _consistent(self):
        if self.params_ratio is not None and self.flops_ratio is not None:
            raise ValueError("give params_ratio or flops_ratio, not both")
        if self.unit_batch != "auto" and self.unit_batch < 1:
            raise ValueError("unit_batch must be at least 1 or 'auto'")
        if self.fast.enabled and self.unit_batch not in (1, "auto"):
            raise ValueError("unit_batch batches exact single-unit trials; it cannot be combined with fast")
        return self

    @model_validator(mode="after")
    def _one_target_and_exact_fast_modes(self):
        targets = [n for n in ("params_ratio", "flops_ratio", "latency_ratio") if getattr(self, n) is not None]
        if len(targets) > 1:
            raise ValueError(f"give one replay target, not {' and '.join(targets)}")
        if self.precision != "fp32" and self.fast.enabled:
            raise ValueError("reduced precision (precision) applies to exact single-unit trials; it cannot be "
                             "combined with fast")
        return self

    @model_validator(mode="after")
    def _compensation_fits(self):
        """Refused up front, not after the analysis: what the replay or the engine would refuse."""
        if self.intervention == "zero":
            return self
        if "bias" in self.recovery.methods:
            raise ValueError(f"recovery bias folds the removed units' means, which intervention {self.intervention} "
                             "already does; use least_squares or bn")
        if self.engine == "delta":
            raise ValueError("engine delta updates the first reader by the cut's share alone; a compensated cut "
                             f"(intervention {self.intervention}) changes more: use engine staged or auto")
        return self
