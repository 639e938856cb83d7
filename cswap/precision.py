"""Reduced precision for the trials (`pruning.precision: fp32 | tf32 | bf16`), opt-in.

Why only the trials: they are nearly all of an analysis' arithmetic (one pass over S per
unit), and a GPU runs them several times faster in TF32 or bf16. What a run reports (the
baseline sigma, the network's cached activations, xi's denominator, the pruned model's
metrics) stays fp32, so reduced precision can change decisions but never a reported number.

Why each trial is compared with the uncut network *in the same precision*: bf16 keeps 8 bits
of mantissa, so a bf16 forward differs from the fp32 one by up to about 1e-2 of sigma whatever
is cut, and compared with the fp32 sigma that round-off is read as part of the cut's effect.
Measured on the demo ResNet-8 with bf16 autocast on CPU (docs/results/performance.md, "Reduced
precision"): against the fp32 sigma, 2 of 224 units changed category and xi moved by up to
0.032 (the median |xi| is 0.009); against the uncut network in bf16, every category was kept
and xi moved by at most 0.0019. So a trial of a layer's
unit is compared with `engine.reference(layer)`, the uncut network run along the same path (the
same cached stage inputs, the same modules) in the same precision, computed once per layer and
network state: a cut that changes nothing changes nothing, and the test is handed
sigma + (sigma*_p - sigma_p), the effect as reduced precision sees it, against the fp32 sigma.
A removal re-runs the removed unit's trial in fp32, so the next baseline and the engine's cache
are exactly the fp32 network's (one extra pass per removal, one per layer for its reference).

TF32 changes only CUDA matmuls and convolutions; on a CPU it would be fp32 under another name,
so it is refused there (`ConfigError`) rather than accepted as a silent no-op. bf16 autocast
runs on CPU and CUDA (on CPUs without bf16 units it is slower than fp32: it is offered there to
measure what it costs in decisions, not for speed). Reduced precision is never a default, and
`precision: fp32` adds nothing: no wrapper, no context, the plan byte-identical.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from .errors import ConfigError
from .interfaces import Scores, Unit


def check(precision: str, device) -> None:
    """Refuse a precision the device cannot honour (tf32 off CUDA)."""
    if precision == "tf32" and torch.device(device).type != "cuda":
        raise ConfigError(f"pruning.precision tf32 changes only CUDA matmuls and convolutions; on "
                          f"{torch.device(device).type} it would be fp32 under another name: use fp32, or bf16 "
                          "(autocast)")


@contextlib.contextmanager
def tf32_allowed(allowed: bool) -> Iterator[None]:
    """CUDA matmuls and cuDNN convolutions with TF32 allowed or not for the block (restored after)."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def exact_fp32(device):
    """fp32 that is fp32: torch lets cuDNN convolutions use TF32 by default, so on CUDA both
    TF32 flags are off for the block; elsewhere nothing changes."""
    return tf32_allowed(False) if torch.device(device).type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def arithmetic(precision: str, device) -> Iterator[None]:
    """The block's forwards in `precision`: fp32 unchanged; tf32 allows TF32 in CUDA matmuls and
    cuDNN convolutions (restored after); bf16 runs under autocast on the device's type."""
    if precision == "fp32":
        yield
        return
    check(precision, device)
    if precision == "tf32":
        with tf32_allowed(True):
            yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        yield


def with_precision(engine, precision: str, device):
    """`engine` itself for fp32; else an engine whose trials run in `precision` (see module)."""
    if precision == "fp32":
        return engine
    check(precision, device)
    return ReducedPrecision(engine, precision, device)


class ReducedPrecision:
    """An engine (`cswap.engine.FullForward` or `Staged`) whose trials run in reduced precision,
    each compared with the uncut network in the same precision; baselines and removals in fp32.
    Everything else is the wrapped engine's."""

    def __init__(self, engine, precision: str, device):
        self.engine, self.precision, self.device = engine, precision, device
        self.base: Scores | None = None
        self._references: dict[str, Scores] = {}

    def __getattr__(self, name):  # the wrapped engine's attributes (batches, passes, can_batch, ...)
        return getattr(self.__dict__["engine"], name)

    def baseline(self) -> Scores:
        self._references.clear()
        self.base = self.engine.baseline()
        return self.base

    def trial(self, units: Unit | Sequence[Unit], stop=None, marks: Sequence[int] = ()) -> Scores:
        units = [units] if isinstance(units, Unit) else list(units)
        with arithmetic(self.precision, self.device):
            star = self.engine.trial(units, stop, marks)
        return self._shifted(star, self._reference(units[0].layer))

    def trials(self, units: Sequence[Unit]) -> list[Scores]:
        with arithmetic(self.precision, self.device):
            stars = self.engine.trials(units)
        reference = self._reference(units[0].layer)
        return [self._shifted(star, reference) for star in stars]

    def commit(self, units: Unit | Sequence[Unit]) -> Scores:
        """Keep `units` cut; their trial is re-run in fp32 first, so the engine's cache is the
        fp32 network's. Returns that sigma: the new baseline (`Trials.remove` uses it)."""
        units = [units] if isinstance(units, Unit) else list(units)
        exact = self.engine.trial(units)
        self.engine.commit(units)
        self._references.clear()
        self.base = exact
        return exact

    def cut(self, unit: Unit) -> None:
        self.engine.cut(unit)
        self._references.clear()

    def _reference(self, layer: str) -> Scores:
        if layer not in self._references:
            with arithmetic(self.precision, self.device):
                self._references[layer] = self.engine.reference(layer)
        return self._references[layer]

    def _shifted(self, star: Scores, reference: Scores) -> Scores:
        """sigma + (sigma*_p - sigma_p): the reduced-precision effect on the fp32 baseline."""
        n = len(star.values)
        return Scores(self.base.values[:n] + (star.values - reference.values[:n]), star.groups)
