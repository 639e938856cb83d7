"""The run's pruning options, declared once: names, defaults, validation and documentation.

`PruningOptions` is the `pruning:` section of a run config, the keyword arguments of
`cswap.analyze`, and what the pruner and the causal criteria (C-SWAP, C-BP, AMP) read; no
other module declares one of these options again. Adding an option is one field here (see
docs/design.md, "Adding an option"): config validation, the API's keywords and the
documentation all come from the field's type, default and description.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ENGINES = ("auto", "staged", "delta", "full")
PRECISIONS = ("fp32", "tf32", "bf16")


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
    fast: FastOptions = Field(FastOptions(), description="opt-in shortcuts (cswap/pruner/fast.py); the plan may differ")
    verify_units: bool = Field(True, description="check every layer's cut against its physical removal before the "
                               "analysis and leave out layers where they differ (cswap/verify.py)")

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
        if self.precision != "fp32" and self.fast.enabled:
            raise ValueError("reduced precision (precision) applies to exact single-unit trials; it cannot be "
                             "combined with fast")
        return self
