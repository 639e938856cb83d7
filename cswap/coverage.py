"""Whether the sample set S can answer for the model: finite inputs, labels the model can
predict, and every class the model predicts.

Why: C-SWAP keeps a unit when cutting it significantly hurts some class of S. A class that
has no sample in S can never vote, so every unit that serves only that class looks neutral
and is removed: an S holding only class 0 of a 10-class model removed 92 % of the
parameters and left 10 % accuracy, without a word. A task declares how many classes S must
cover (`Task.num_classes`); the model's output width (dim 1 of its output on the example
input: logits (N, C) or (N, C, H, W)) raises that number when larger. A task that declares
nothing (`None`, e.g. a third-party task whose groups are not classes) is not checked.
Two mistakes come first, because they make every count below meaningless: a label the model
cannot predict (S's class 12 for a 10-output model: the data and the model do not match),
and a non-finite input (a NaN in S turns every score into NaN, hours later). Both are named
by their first offending sample.
"""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from .errors import DataError
from .interfaces import Manifold, Task

log = logging.getLogger("cswap")


def output_width(model: nn.Module, example: torch.Tensor) -> int | None:
    """dim 1 of the model's output on `example`, or None for an output that is not a tensor."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        out = model.eval()(example.to(device))
    return int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() >= 2 else None


def check_coverage(task: Task, manifold: Manifold, model: nn.Module, example: torch.Tensor) -> None:
    """Refuse (or, for a task whose `missing_classes` is "warn", warn loudly) when S has no
    sample of some class the model predicts; the message names the classes present."""
    check_finite_inputs(manifold)
    expected = task.num_classes
    if expected is None:
        return
    width = output_width(model, example)
    present = sorted(int(k) for k in manifold.class_counts)
    outside = [k for k in present if k < 0 or (width is not None and k >= width)]
    if outside:
        shown = outside if len(outside) <= 10 else outside[:10] + ["..."]
        raise DataError(f"the sample set S holds labels {shown} that the model cannot predict: it has {width} outputs "
                        f"(classes 0 to {width - 1}); the data and the model do not match")
    expected = max(expected, width or 0)
    missing = sorted(set(range(expected)) - set(present))
    if not missing:
        return
    shown = missing if len(missing) <= 10 else missing[:10] + ["..."]
    msg = (f"the sample set S covers {len(present)} of the {expected} classes the model predicts "
           f"(present: {present}; missing: {shown}): pruning would not see what it does to the missing classes")
    if task.missing_classes == "warn":
        log.warning(msg)
        warnings.warn(msg)
        return
    raise DataError(msg + "; give S samples of every class")


def check_finite_inputs(manifold: Manifold) -> None:
    """Refuse an S whose input tensors hold NaN or infinity, naming the first such sample
    (batches in order, samples counted from 0 across them)."""
    seen = 0
    for inputs, _ in manifold.batches:
        if not (isinstance(inputs, torch.Tensor) and inputs.dim() > 0):
            continue  # inputs that are not a batch tensor (a third-party task's): nothing to say
        if inputs.is_floating_point():
            bad = ~torch.isfinite(inputs.reshape(len(inputs), -1)).all(1)
            if bool(bad.any()):
                raise DataError(f"the sample set S holds non-finite values (NaN or infinity), first in sample "
                                f"{seen + int(torch.nonzero(bad)[0, 0])}; check the data and its normalisation "
                                "(a zero std?)")
        seen += len(inputs)
