"""What a pruned model costs: parameters, multiply-accumulates, measured latency.

Structured pruning is worth it only if the model gets faster, so reports put the measured
latency of the pruned model beside the original's, not just counts.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch_pruning as tp
from torch import nn


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass (torch-pruning's counter; 1 MAC ~ 2 FLOPs)."""
    macs, _ = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs)


@torch.no_grad()
def latency_ms(model: nn.Module, example_inputs: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass in milliseconds (synchronised on CUDA)."""
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if example_inputs.is_cuda else (lambda: None)
    for _ in range(warmup):
        model(example_inputs)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(example_inputs)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    model.train(was_training)
    return statistics.median(times)


def model_costs(model: nn.Module, example_inputs: torch.Tensor, batch: int = 32, repeats: int = 20) -> dict:
    """Parameters, MACs per sample, and median latency at batch 1 and at `batch`."""
    one = example_inputs[:1]
    many = one.expand(batch, *one.shape[1:]).contiguous()
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "macs": count_macs(model, one),
        "latency_ms_batch1": round(latency_ms(model, one, repeats), 4),
        f"latency_ms_batch{batch}": round(latency_ms(model, many, max(3, repeats // 4)), 4),
    }
