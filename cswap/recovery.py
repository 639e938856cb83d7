"""Recovery after removal, in closed form: no gradients, no labels, no training.

After units are removed, the layers that read them (their *readers*) see fewer inputs. Three
repairs, each computed from unlabeled calibration data (never the evaluation data):

- `bias`: each removed input's mean contribution is folded into its reader's bias, or into
  the running mean of the BatchNorm right after the reader when it has no bias (FLAP's mean
  ablation: the reader sees the removed input's mean instead of zero);
- `bn`: the running statistics of every BatchNorm whose input changed are re-estimated
  (adaptive BN, EagleEye);
- `least_squares`: the kept input weights and the bias of every reader are re-fitted so its
  output on the calibration data matches the unpruned model's at the same place (ThiNet;
  Kwon et al. 2022), ridge-regularised normal equations accumulated batch by batch (memory
  bounded by the reader's Gram matrix); convolutions through their unfolded input patches.

Methods compose with "+", applied in the order written (`least_squares+bn`). Readers are
visited in network order, each seeing the inputs that the already-repaired layers before it
produce (`sequential`); `local` takes every reader's inputs from the model before any repair.

All repairs work on the *cut* model (the unpruned architecture with the removed units' reads
zeroed, which equals the pruned model: cut == removal, checked for every layer). Its input
and output channels keep the unpruned numbering, so no index bookkeeping is needed, and the
caller then removes the cut units physically (`PruningPlan.apply_prefix`), which carries the
repaired weights, biases and statistics over to the smaller model exactly.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError
from .hooks import trace_calls
from .interfaces import Unit, UnitGraph

log = logging.getLogger("cswap")

METHODS = ("bias", "bn", "least_squares")
_BN = nn.modules.batchnorm._BatchNorm


def parse_recovery(text: str | None) -> tuple[str, ...]:
    """"least_squares+bn" -> ("least_squares", "bn"); None, "" and "none" are no recovery."""
    if not text or text == "none":
        return ()
    methods = tuple(m.strip() for m in text.split("+"))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or len(set(methods)) != len(methods):
        raise ConfigError(f"recovery {text!r}: use one or more of {', '.join(METHODS)} joined by '+' (or none)")
    return methods


@dataclass
class Reader:
    """A convolution or linear layer that reads removed units: which of its input features
    (columns of the weight's dim 1, in the unpruned numbering) are gone."""

    name: str
    module: nn.Module
    removed: list[int]
    kept: list[int]
    bias_sink: str  # where a constant shift of its output goes: "bias", a BatchNorm's name, or ""


@dataclass
class RecoveryReport:
    methods: tuple[str, ...]
    readers: int = 0
    batchnorms: int = 0
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)  # reader -> why a repair was left out

    def to_json(self) -> dict:
        return {"methods": "+".join(self.methods) or "none", "readers": self.readers, "batchnorms": self.batchnorms,
                "seconds": round(self.seconds, 3), "skipped": self.skipped}


def recover(cut: nn.Module, original: nn.Module, graph: UnitGraph, units: Sequence[Unit],
            calibration: Sequence[torch.Tensor], methods: Sequence[str], *, sequential: bool = True,
            ridge: float = 1e-3, progress: bool = False) -> RecoveryReport:
    """Repair `cut` (a copy of `original` with `units` cut) in place with `methods`, on the
    calibration inputs (batches of model inputs). `original` is never changed."""
    started = time.perf_counter()
    report = RecoveryReport(tuple(methods))
    readers = find_readers(cut, graph, units, calibration[0][:1])
    report.readers = len(readers)
    cut.eval()
    for method in methods:
        if method == "bn":
            report.batchnorms = reestimate_batchnorm(cut, original, calibration)
            continue
        snapshot = None if sequential else _InputSnapshot(cut, readers, calibration)
        bar = tqdm(readers, desc=f"recovery ({method})", unit="layer", disable=not progress)
        for reader in bar:
            why = (fold_means if method == "bias" else refit_least_squares)(
                reader, cut, original, calibration, snapshot=snapshot, ridge=ridge)
            if why:
                report.skipped[f"{method}:{reader.name}"] = why
    report.seconds = time.perf_counter() - started
    log.info("recovery %s: %d readers, %d BatchNorms in %.1f s", "+".join(methods) or "none", report.readers,
             report.batchnorms, report.seconds)
    return report


def find_readers(model: nn.Module, graph: UnitGraph, units: Iterable[Unit], probe: torch.Tensor) -> list[Reader]:
    """The readers of `units` in execution order, with their removed and kept input columns."""
    removed: dict[str, set[int]] = {}
    layers = {layer.name: layer for layer in graph.layers}
    for unit in units:
        for pname, dim, per_channel in layers[unit.layer].reads:
            if dim == 1 and per_channel[unit.channel]:
                removed.setdefault(pname.rpartition(".")[0], set()).update(per_channel[unit.channel])
    modules = dict(model.named_modules())
    sinks = _bias_sinks(model, [modules[n] for n in removed], probe)
    order = trace_calls(model.eval(), probe, [modules[n] for n in removed]).order
    readers = []
    for name, gone in removed.items():
        module = modules[name]
        width = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        readers.append(Reader(name, module, sorted(gone), [i for i in range(width) if i not in gone], sinks[module]))
    return sorted(readers, key=lambda r: order.get(r.module, 1 << 30))


def _bias_sinks(model: nn.Module, readers: list[nn.Module], probe: torch.Tensor) -> dict[nn.Module, str]:
    """Where each reader's constant output shift can go: its own bias, else a BatchNorm that
    takes the reader's output tensor as its input (found on a probe forward), else nowhere."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, nn.Module] = {}
    sinks = {r: "bias" for r in readers if r.bias is not None}

    def watch(module, args, output) -> None:
        if module in readers and torch.is_tensor(output):
            produced[id(output)] = module
        elif isinstance(module, _BN) and args and id(args[0]) in produced:
            sinks.setdefault(produced[id(args[0])], names[module])

    keep = []  # outputs stay alive during the forward, so their ids are unique
    trace_calls(model.eval(), probe, on_call=lambda m, a, o: (keep.append(o), watch(m, a, o)))
    return {r: sinks.get(r, "") for r in readers}


class _Stop(Exception):
    """Ends a forward pass once the module of interest has run."""


def _module_io(model: nn.Module, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output of `module` when `model` runs on `x`, without running the rest."""
    seen: dict[str, torch.Tensor] = {}

    def hook(mod, args, output):
        seen["in"], seen["out"] = args[0].detach(), output.detach()
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["in"], seen["out"]


class _InputSnapshot:
    """Every reader's inputs on the calibration data, taken once before any repair (`local`)."""

    def __init__(self, model: nn.Module, readers: list[Reader], calibration: Sequence[torch.Tensor]):
        self.inputs = {r.name: [_module_io(model, r.module, x)[0] for x in calibration] for r in readers}

    def of(self, reader: Reader, b: int) -> torch.Tensor:
        return self.inputs[reader.name][b]


def _reader_inputs(reader: Reader, cut: nn.Module, x: torch.Tensor, b: int, snapshot) -> torch.Tensor:
    return snapshot.of(reader, b) if snapshot is not None else _module_io(cut, reader.module, x)[0]


def _features(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A reader's input as rows of features: a linear layer's last dim, or a convolution's
    unfolded patches (channel-major, as its weight is flattened)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _targets(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A reader's output as rows matching `_features` (positions, then samples)."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


def _columns(module: nn.Module, channels: list[int]) -> torch.Tensor:
    """Columns of the flattened weight that belong to input channels `channels`."""
    k = 1 if isinstance(module, nn.Linear) else module.weight[0, 0].numel()
    return torch.tensor([c * k + i for c in channels for i in range(k)], dtype=torch.long)


def _supported(reader: Reader) -> str:
    m = reader.module
    if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"):
        return ""
    return f"{type(m).__name__} (groups, padding mode or dimensionality) is not repaired"


def fold_means(reader: Reader, cut: nn.Module, original: nn.Module, calibration, *, snapshot=None,
               ridge: float = 0.0) -> str:
    """`bias`: add what the removed inputs contributed on average to the reader's output."""
    if why := _supported(reader) or ("" if reader.bias_sink else "no bias and no BatchNorm after it"):
        return why
    m, gone = reader.module, torch.tensor(reader.removed)
    total, count = None, 0
    for b, x in enumerate(calibration):
        rows = _features_of_channels(m, _reader_inputs(reader, cut, x, b, snapshot), gone)
        total = rows.sum(0, dtype=torch.float64) if total is None else total + rows.sum(0, dtype=torch.float64)
        count += rows.shape[0]
    weight = dict(original.named_modules())[reader.name].weight.detach().double()
    shift = weight.flatten(1)[:, _columns(m, reader.removed)] @ (total / count)
    _shift_output(cut, reader, shift.to(m.weight.dtype))
    return ""


def _features_of_channels(module: nn.Module, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    dim = -1 if isinstance(module, nn.Linear) else 1
    return _features(module, x.index_select(dim, channels.to(x.device)))


def _shift_output(model: nn.Module, reader: Reader, shift: torch.Tensor) -> None:
    """Add `shift` to the reader's output: to its bias, or as minus the running mean of the
    BatchNorm right after it (BN(y + s) with mean m is BN(y) with mean m - s)."""
    with torch.no_grad():
        if reader.bias_sink == "bias":
            reader.module.bias.add_(shift.to(reader.module.bias.device))
        else:
            bn = model.get_submodule(reader.bias_sink)
            bn.running_mean.sub_(shift.to(bn.running_mean.device))


def refit_least_squares(reader: Reader, cut: nn.Module, original: nn.Module, calibration, *, snapshot=None,
                        ridge: float = 1e-3) -> str:
    """`least_squares`: kept weights and bias so the reader's output matches the original's."""
    if why := _supported(reader):
        return why
    m = reader.module
    cols = _columns(m, reader.kept)
    intercept = bool(reader.bias_sink)
    gram = cross = None
    target_module = dict(original.named_modules())[reader.name]
    for b, x in enumerate(calibration):
        feats = _features(m, _reader_inputs(reader, cut, x, b, snapshot))[:, cols.to(x.device)].double()
        if intercept:
            feats = torch.cat([feats, torch.ones(len(feats), 1, dtype=feats.dtype, device=feats.device)], 1)
        y = _targets(m, _module_io(original, target_module, x)[1]).double()
        gram = feats.T @ feats if gram is None else gram + feats.T @ feats
        cross = feats.T @ y if cross is None else cross + feats.T @ y
    solution = _ridge_solve(gram, cross, ridge, intercept)
    _set_fit(cut, reader, cols, solution, intercept)
    return ""


def _ridge_solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float, intercept: bool) -> torch.Tensor:
    """argmin ||X A - Y||^2 + lambda ||A_weights||^2 with lambda = ridge * mean(diag(X^T X))."""
    n = gram.shape[0] - int(intercept)
    lam = ridge * gram.diagonal()[:n].mean().clamp_min(1e-12)
    reg = torch.zeros_like(gram)
    reg.diagonal()[:n] = lam
    return torch.linalg.solve(gram + reg, cross)


def _set_fit(cut: nn.Module, reader: Reader, cols: torch.Tensor, solution: torch.Tensor, intercept: bool) -> None:
    m = reader.module
    with torch.no_grad():
        flat = m.weight.detach().flatten(1).clone()
        flat[:, cols.to(flat.device)] = solution[: len(cols)].T.to(flat.dtype)
        m.weight.copy_(flat.view_as(m.weight))
        if not intercept:
            return
        fitted = solution[len(cols)].to(m.weight.dtype)
        if reader.bias_sink == "bias":
            m.bias.copy_(fitted)
        else:  # the conv has no bias: its BatchNorm's mean absorbs the fitted intercept
            bn = cut.get_submodule(reader.bias_sink)
            bn.running_mean.sub_(fitted.to(bn.running_mean.device))


@torch.no_grad()
def reestimate_batchnorm(cut: nn.Module, original: nn.Module, calibration: Sequence[torch.Tensor]) -> int:
    """`bn`: reset and re-estimate (cumulative average over the calibration data, in train
    mode for BatchNorm only) the statistics of every BatchNorm whose input differs from the
    unpruned model's on the first calibration batch; returns how many."""
    changed = _changed_batchnorms(cut, original, calibration[0])
    if not changed:
        return 0
    saved = {bn: (bn.momentum, bn.training) for bn in changed}
    for bn in changed:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch weighs by its size
        bn.train()
    try:
        for x in calibration:
            cut(x)
    finally:
        for bn, (momentum, training) in saved.items():
            bn.momentum = momentum
            bn.train(training)
    return len(changed)


def _changed_batchnorms(cut: nn.Module, original: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    inputs: dict[str, dict[str, torch.Tensor]] = {"cut": {}, "original": {}}
    for key, model in (("cut", cut), ("original", original)):
        names = {m: n for n, m in model.named_modules()}
        trace_calls(model.eval(), x, [m for m in model.modules() if isinstance(m, _BN)],
                    lambda m, a, o, key=key, names=names: inputs[key].__setitem__(names[m], a[0].detach()))
    modules = dict(cut.named_modules())
    return [modules[n] for n, a in inputs["cut"].items()
            if n in inputs["original"] and not torch.equal(a, inputs["original"][n])]
