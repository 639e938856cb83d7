"""Latency in the runtime a model is deployed with: eager PyTorch, PyTorch with channels_last
memory, or onnxruntime; timed in turns, with the spread reported and judged.

Why: a pruned model can be slower where it is deployed than in eager PyTorch (torchvision
ResNet-18 at 50 % of its parameters was x0.66 in onnxruntime at batch 32, issue 28), so a
latency table, a latency target and a report should time the runtime users ship. And a
median alone hides a busy machine: the same target removed 86 % of the parameters under load
and 61 % on a quiet machine. So every timing carries its spread (interquartile range over
median) and is marked untrusted above `MAX_SPREAD`, with what to do about it.

Models are timed in turns (one call of each per round, as `cswap.metrics.latencies_ms`; each
round starting one model later), so a change of load hits all of them alike. Inputs are
converted to what each runtime takes
(channels_last memory, a numpy array) before the timing; onnxruntime runs the ONNX file
`cswap export` would write (`cswap.onnx_export`, dynamic batch), on the CPU, with a stated
number of intra-op threads (default: torch's), one inter-op thread, sequential execution.
"""
from __future__ import annotations

import copy
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger("cswap")

BACKENDS = ("torch", "torch_channels_last", "onnxruntime")
#: `round_to` a target gets when it names none, per backend: onnxruntime's blocked (NCHWc)
#: kernels need widths in multiples of 4 (unaligned MobileNetV2 at 50 % of its parameters ran
#: x0.58 at batch 32; at 4 every benchmarked model was faster in every cell); eager torch gained
#: nothing consistent from alignment, so it keeps the plan's exact widths (docs/results/latency.md)
DEFAULT_ROUND_TO = {"torch": None, "torch_channels_last": None, "onnxruntime": 4}
#: a timing whose interquartile range exceeds this share of its median is not trusted for a target
MAX_SPREAD = 0.10


@dataclass(frozen=True)
class Timing:
    """One model's latency in one backend: the median of its rounds and how much they varied."""

    median_ms: float
    spread: float  # interquartile range / median of the rounds
    p10_ms: float  # 10th percentile: under load, the closest to what the model takes on an idle machine
    rounds: int
    backend: str
    threads: int
    trusted: bool  # spread <= the threshold it was measured with

    def to_json(self) -> dict:
        return {"median_ms": round(self.median_ms, 4), "spread": round(self.spread, 4),
                "p10_ms": round(self.p10_ms, 4), "rounds": self.rounds,
                "backend": self.backend, "threads": self.threads, "trusted": self.trusted}


@dataclass
class Runner:
    """A model prepared for one backend: `feed` turns an input batch into what `run` takes
    (done once, outside the timing), `run` makes one forward pass."""

    run: Callable[[Any], Any]
    feed: Callable[[torch.Tensor], Any]


def latencies_ms(models: Sequence[nn.Module], example_inputs: torch.Tensor, repeats: int = 20, warmup: int = 3,
                 min_seconds: float = 1.0, *, backend: str = "torch", threads: int | None = None) -> list[float]:
    """Median milliseconds of one forward pass of each model in `backend`, timed in turns: the
    call shape of `cswap.metrics.latencies_ms`. An untrusted spread is logged as a warning."""
    timings = measure(models, example_inputs, repeats, warmup, min_seconds, backend=backend, threads=threads)
    warn_if_untrusted(timings)
    return [t.median_ms for t in timings]


def measure(models: Sequence[nn.Module], example_inputs: torch.Tensor, repeats: int = 20, warmup: int = 3,
            min_seconds: float = 1.0, *, backend: str = "torch", threads: int | None = None,
            max_spread: float = MAX_SPREAD) -> list[Timing]:
    """A `Timing` of each model in `backend` on `example_inputs` (see `prepare` and `time_runners`)."""
    with tempfile.TemporaryDirectory(prefix="cswap-latency-") as folder:
        runners = prepare(models, example_inputs, backend, threads=threads, folder=folder)
        return time_runners(runners, example_inputs, repeats, warmup, min_seconds, backend=backend,
                            threads=threads, max_spread=max_spread)


def prepare(models: Sequence[nn.Module], example_inputs: torch.Tensor, backend: str, *, threads: int | None = None,
            folder: str | Path | None = None) -> list[Runner]:
    """Each model as a `Runner` of `backend` (the models themselves are not changed). For
    onnxruntime, the files go to `folder` (which must outlive the runners), traced on
    `example_inputs[:1]` with a dynamic batch, so one preparation serves every batch size."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown latency backend {backend!r}; backends: {', '.join(BACKENDS)}")
    if backend == "torch":
        return [Runner(_eager(m), lambda x: x) for m in models]
    if backend == "torch_channels_last":
        if example_inputs.dim() != 4:
            raise ConfigError(f"backend torch_channels_last needs image batches (N, C, H, W), got "
                              f"{example_inputs.dim()} axes")
        to_last = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
        return [Runner(_eager(copy.deepcopy(m).to(memory_format=torch.channels_last)), to_last) for m in models]
    if example_inputs.device.type != "cpu":
        raise ConfigError("backend onnxruntime times on the CPU (CPUExecutionProvider): give CPU inputs, or use "
                          "backend torch on this device")
    if folder is None:
        raise ValueError("the onnxruntime backend needs a folder for its ONNX files")
    return [_onnxruntime(m, example_inputs[:1], Path(folder) / f"model{i}.onnx", threads) for i, m in enumerate(models)]


def _eager(model: nn.Module) -> Callable[[torch.Tensor], Any]:
    @torch.no_grad()
    def run(x: torch.Tensor):
        return model(x)

    return run


def _onnxruntime(model: nn.Module, example: torch.Tensor, path: Path, threads: int | None) -> Runner:
    """The model's ONNX file (as `cswap export` writes it) in an onnxruntime CPU session."""
    from .onnx_export import session, write_onnx

    written = write_onnx(copy.deepcopy(model).cpu().eval(), example.cpu(), path, threads=threads)
    if 0 not in written.dynamic_axes:
        log.warning("ONNX file of %s has a fixed batch: %s", type(model).__name__, written.note)
    runner = session(path, threads)
    name = runner.get_inputs()[0].name
    return Runner(lambda feed: runner.run(None, feed), lambda x: {name: x.detach().cpu().numpy()})


def time_runners(runners: Sequence[Runner], example_inputs: torch.Tensor, repeats: int = 20, warmup: int = 3,
                 min_seconds: float = 1.0, *, backend: str = "torch", threads: int | None = None,
                 max_spread: float = MAX_SPREAD) -> list[Timing]:
    """Time the runners in turns on `example_inputs`: `warmup` rounds, then at least `repeats`
    rounds and more (up to 50x) while they have taken less than `min_seconds`. Each round
    starts one runner later than the one before, so no runner always follows the same other
    one (a runner after a long one can find cold caches). Eager backends run with `threads`
    torch threads (restored after)."""
    feeds = [r.feed(example_inputs) for r in runners]
    sync = torch.cuda.synchronize if example_inputs.is_cuda else (lambda: None)
    used = threads or torch.get_num_threads()
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            for r, feed in zip(runners, feeds):
                r.run(feed)
        sync()
        times: list[list[float]] = [[] for _ in runners]
        started, rounds = time.perf_counter(), 0
        n = len(runners)
        while rounds < repeats or (time.perf_counter() - started < min_seconds and rounds < 50 * repeats):
            for i in [(rounds + j) % n for j in range(n)]:
                t0 = time.perf_counter()
                runners[i].run(feeds[i])
                sync()
                times[i].append((time.perf_counter() - t0) * 1e3)
            rounds += 1
    finally:
        torch.set_num_threads(before)
    return [_timing(t, backend, used, max_spread) for t in times]


def _timing(times: list[float], backend: str, threads: int, max_spread: float) -> Timing:
    median = statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (median,) * 3
    p10 = statistics.quantiles(times, n=10, method="inclusive")[0] if len(times) > 1 else median
    spread = (q3 - q1) / median if median > 0 else 0.0
    return Timing(median, spread, p10, len(times), backend, threads, spread <= max_spread)


def untrusted_message(timings: Sequence[Timing], max_spread: float = MAX_SPREAD) -> str | None:
    """One line saying which timings varied too much and what to do, or None when all are trusted."""
    bad = [(i, t) for i, t in enumerate(timings) if not t.trusted]
    if not bad:
        return None
    worst = max(t.spread for _, t in bad)
    which = ", ".join(f"model {i} ({t.spread:.0%})" for i, t in bad)
    return (f"latency in {bad[0][1].backend} varied more than {max_spread:.0%} (interquartile range / median) for "
            f"{which}, worst {worst:.0%}: the machine was busy while timing, so these numbers are not trusted for "
            "a latency target; time again on an idle machine, with fixed threads, or with more repeats "
            "(output.latency_repeats)")


def warn_if_untrusted(timings: Sequence[Timing], max_spread: float = MAX_SPREAD) -> None:
    message = untrusted_message(timings, max_spread)
    if message:
        log.warning(message)
