"""Watching one forward pass: which modules run, in what order, how often, what they return.

Several parts of the core need the same observation of a forward pass: the order modules
run in (the staged engine caches what runs before a unit's first reader; layers are visited
from the output to the input), how often each runs (a module called twice cannot be
cached), the tensors they return (a head that returns the model's output is never pruned)
and their shapes (multiply-accumulates). `trace_calls` records it once, with forward hooks
that are removed whatever happens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn


@dataclass
class CallTrace:
    order: dict[nn.Module, int]  # index of each module's first call
    calls: dict[nn.Module, int]  # how many times each module ran
    output: object  # what the model returned


@torch.no_grad()
def trace_calls(model: nn.Module, inputs, modules: Iterable[nn.Module] | None = None,
                on_call: Callable[[nn.Module, tuple, object], None] | None = None) -> CallTrace:
    """Run `model(inputs)` once and record every call of `modules` (default: all of the
    model's, itself included); `on_call(module, args, output)` sees each call as it happens.
    The model's train/eval mode is the caller's."""
    order: dict[nn.Module, int] = {}
    calls: dict[nn.Module, int] = {}

    def record(module, args, output) -> None:  # a forward hook returning None keeps the output
        order.setdefault(module, len(order))
        calls[module] = calls.get(module, 0) + 1
        if on_call is not None:
            on_call(module, args, output)

    targets = list(model.modules()) if modules is None else list(modules)
    hooks = [m.register_forward_hook(record) for m in targets]
    try:
        output = model(inputs)
    finally:
        for h in hooks:
            h.remove()
    return CallTrace(order, calls, output)
