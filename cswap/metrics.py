"""What a pruned model costs: parameters, multiply-accumulates, measured latency.

Structured pruning is worth it only if the model gets faster, so reports put the measured
latency of the pruned model beside the original's, not just counts, in the runtime the user
deploys with (`cswap.backends`), with the spread that says whether to trust it.
"""
from __future__ import annotations

import tempfile
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import backends
from .backends import latencies_ms  # noqa: F401 - the library's one timer (models in turns, in a backend)
from .removal import count_params


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of the first sample of `example_inputs`, in
    eval mode, as torch's `FlopCounterMode` counts them (convolutions and matrix products, the
    work structured pruning shrinks; 1 MAC = 2 FLOPs). One counter everywhere: reports, MAC
    targets and benchmarks agree."""
    was_training = model.training
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.eval()(example_inputs[:1])
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def compare_costs(models: Sequence[nn.Module], example_inputs: torch.Tensor, batch: int = 32, repeats: int = 20,
                  *, backend: str = "torch", threads: int | None = None) -> list[dict]:
    """Parameters, MACs per sample, and latency at batch 1 and at `batch` of each model in
    `backend` (`cswap.backends`: eager PyTorch, channels_last, onnxruntime), the models timed
    in turns; each latency with its spread and whether it can be trusted."""
    one = example_inputs[:1]
    many = one.expand(batch, *one.shape[1:]).contiguous()
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with tempfile.TemporaryDirectory(prefix="cswap-costs-") as folder:
            runners = backends.prepare(models, one, backend, threads=threads, folder=folder)
            single = backends.time_runners(runners, one, repeats, backend=backend, threads=threads)
            batched = backends.time_runners(runners, many, max(5, repeats // 2), backend=backend, threads=threads)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return [{
        "params": count_params(m),
        "macs": count_macs(m, one),
        "latency_ms_batch1": round(a.median_ms, 4),
        f"latency_ms_batch{batch}": round(b.median_ms, 4),
        "latency": {"backend": backend, "threads": a.threads, "batch1": a.to_json(), f"batch{batch}": b.to_json()},
    } for m, a, b in zip(models, single, batched)]


def model_costs(model: nn.Module, example_inputs: torch.Tensor, batch: int = 32, repeats: int = 20) -> dict:
    """Parameters, MACs per sample, and median latency at batch 1 and at `batch`."""
    return compare_costs([model], example_inputs, batch, repeats)[0]
