"""What a pruned model costs: parameters, multiply-accumulates, measured latency.

Structured pruning is worth it only if the model gets faster, so reports put the measured
latency of the pruned model beside the original's, not just counts.
"""
from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
from torch import nn

from .hooks import trace_calls
from .removal import count_params

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def module_macs(model: nn.Module, example_inputs: torch.Tensor) -> dict[nn.Module, int]:
    """Multiply-accumulates per sample of every convolution and linear layer (summed over its
    calls), on the first sample of `example_inputs`, in eval mode. These are the layers
    structured pruning shrinks and nearly all of a CNN's or a ViT's MLP work; normalisation,
    activations and attention's own matrix products are not counted (1 MAC ~ 2 FLOPs)."""
    macs: dict[nn.Module, int] = {}

    def count(module, args, out) -> None:
        per_output = module.in_features if isinstance(module, nn.Linear) else module.weight[0].numel()
        macs[module] = macs.get(module, 0) + out.numel() // out.shape[0] * per_output

    was_training = model.training
    try:
        trace_calls(model.eval(), example_inputs[:1], [m for m in model.modules() if isinstance(m, WEIGHTED)], count)
    finally:
        model.train(was_training)
    return macs


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Multiply-accumulates per sample of one forward pass (`module_macs`, summed)."""
    return sum(module_macs(model, example_inputs).values())


@torch.no_grad()
def latencies_ms(models: Sequence[nn.Module], example_inputs: torch.Tensor, repeats: int = 20,
                 warmup: int = 3, min_seconds: float = 1.0) -> list[float]:
    """Median wall time of one forward pass of each model, in milliseconds (synchronised on CUDA).

    The models are timed in turns, one pass of each per round, so a change of machine load
    during the measurement (another process, frequency scaling) hits all of them alike and the
    ratio between them stays meaningful on a shared machine. At least `repeats` rounds, and
    more (up to 50x) while the rounds have taken less than `min_seconds`: small models are
    timed many times at little cost, where a few passes would leave the median to noise.
    """
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    sync = torch.cuda.synchronize if example_inputs.is_cuda else (lambda: None)
    for _ in range(warmup):
        for m in models:
            m(example_inputs)
    sync()
    times: list[list[float]] = [[] for _ in models]
    started = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - started < min_seconds and rounds < 50 * repeats):
        rounds += 1
        for m, t in zip(models, times):
            t0 = time.perf_counter()
            m(example_inputs)
            sync()
            t.append((time.perf_counter() - t0) * 1e3)
    for m, mode in zip(models, modes):
        m.train(mode)
    return [statistics.median(t) for t in times]


def latency_ms(model: nn.Module, example_inputs: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass in milliseconds (synchronised on CUDA)."""
    return latencies_ms([model], example_inputs, repeats, warmup)[0]


def compare_costs(models: Sequence[nn.Module], example_inputs: torch.Tensor, batch: int = 32,
                  repeats: int = 20) -> list[dict]:
    """Parameters, MACs per sample, and median latency at batch 1 and at `batch` of each model,
    the latencies measured in turns (see `latencies_ms`)."""
    one = example_inputs[:1]
    many = one.expand(batch, *one.shape[1:]).contiguous()
    single = latencies_ms(models, one, repeats)
    batched = latencies_ms(models, many, max(5, repeats // 2))
    return [{
        "params": count_params(m),
        "macs": count_macs(m, one),
        "latency_ms_batch1": round(a, 4),
        f"latency_ms_batch{batch}": round(b, 4),
    } for m, a, b in zip(models, single, batched)]


def model_costs(model: nn.Module, example_inputs: torch.Tensor, batch: int = 32, repeats: int = 20) -> dict:
    """Parameters, MACs per sample, and median latency at batch 1 and at `batch`."""
    return compare_costs([model], example_inputs, batch, repeats)[0]
