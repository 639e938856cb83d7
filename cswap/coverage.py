"""Whether the sample set S can answer for every class the model predicts.

Why: C-SWAP keeps a unit when cutting it significantly hurts some class of S. A class that
has no sample in S can never vote, so every unit that serves only that class looks neutral
and is removed: an S holding only class 0 of a 10-class model removed 92 % of the
parameters and left 10 % accuracy, without a word. A task declares how many classes S must
cover (`Task.num_classes`); the model's output width (dim 1 of its output on the example
input: logits (N, C) or (N, C, H, W)) raises that number when larger. A task that declares
nothing (`None`, e.g. a third-party task whose groups are not classes) is not checked.
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
    expected = task.num_classes
    if expected is None:
        return
    expected = max(expected, output_width(model, example) or 0)
    present = sorted(int(k) for k in manifold.class_counts)
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
