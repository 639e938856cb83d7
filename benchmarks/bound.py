"""The work Algorithm 1 cannot avoid, in multiply-accumulates, per unit (benchmarks/engine_speed.py).

For a unit, everything before its first reader C is unchanged by the cut (it can be cached),
and everything from C to the output must be recomputed. C's own output can instead be
updated by subtracting the cut channel's share (a rank-one update). The shares below are
those costs divided by a full forward pass (what the naive algorithm pays per unit),
averaged over all units; an engine's wall time divided by the naive time can be compared
with them.
"""
from __future__ import annotations

import torch
from torch import nn

from torch.utils.flop_counter import FlopCounterMode

from cswap.hooks import trace_calls
from cswap.interfaces import UnitGraph

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def module_macs(model: nn.Module, example_inputs: torch.Tensor) -> dict[nn.Module, int]:
    """MACs of every convolution and linear layer in one forward of the first sample, as
    torch's FlopCounterMode counts them (the library's one counter, `cswap.metrics`)."""
    names = {f"{type(model).__name__}.{n}": m for n, m in model.named_modules() if isinstance(m, WEIGHTED)}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(example_inputs[:1])
    return {names[k]: sum(v.values()) // 2 for k, v in counter.get_flop_counts().items() if k in names}


def unavoidable_share(model: nn.Module, graph: UnitGraph, example_inputs: torch.Tensor) -> dict[str, float]:
    """Mean over units of (MACs from the first reader on) / (MACs of a full forward)."""
    macs = module_macs(model, example_inputs)
    order = trace_calls(model.eval(), example_inputs[:1], [m for m in model.modules() if isinstance(m, WEIGHTED)]).order
    total = sum(macs.values())
    cached = delta = 0.0
    units = 0
    for layer in graph.layers:
        readers = [model.get_submodule(name) for name in layer.readers()]
        first = min(readers, key=lambda m: order.get(m, 1 << 30))
        suffix = sum(c for m, c in macs.items() if order[m] >= order[first])
        in_width = first.in_features if isinstance(first, nn.Linear) else first.weight.shape[1]
        share_of_first = macs[first] / in_width  # one input channel's share of C
        cached += layer.channels * suffix
        delta += layer.channels * (suffix - macs[first] + share_of_first)
        units += layer.channels
    return {
        "macs_full_forward": total,
        "units": units,
        "share_cached_prefix": cached / (units * total),
        "share_with_delta": delta / (units * total),
    }
