"""How sigma* is computed for one cut unit: the cost Algorithm 1 pays per unit.

An engine owns the intervention it evaluates (`cswap.intervention.Intervention`, handed in
or made over its model), so a trial is "sigma* on S with these units cut": the engine cuts
them, scores, and restores them; `commit` keeps the last trial's units cut for good.

`FullForward` runs the whole network over S for every unit (the paper's cost). `Staged`
uses the adapter's chain of stages: a cut only changes what happens from the stage holding
the unit's first reader onwards, so the inputs of every stage are cached for the current
network and only the suffix is re-run. When the pruner removes a unit, the suffix inputs
computed during that unit's trial are exactly the new network's, so the cache is updated
without an extra pass. Both run the same modules in the same order on the same tensors, so
their scores are bitwise equal (checked once at start-up; on a mismatch the staged engine
refuses and the pruner falls back to full forwards).

`Staged.trials` evaluates several units of one layer in one pass on a batch k times larger:
copy j of S sees unit j cut, by zeroing the features unit j's readers take as input, which is
what zeroing their weight slices does. Each result holds for the network as it is; the pruner
throws away the later results once a unit is removed (speculative evaluation).
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .contract import check_scores
from .distributed import rank_and_world
from .errors import ConfigError, NumericalError
from .hooks import trace_calls
from .interfaces import Layer, Manifold, Scores, ScoringFunction, Unit, UnitGraph
from .intervention import Intervention
from .options import ENGINES

log = logging.getLogger("cswap")

Stop = Callable[[Scores], bool]  # decides from the scores of the first batches whether a trial may end


class FullForward:
    """sigma of the network on S by full forward passes over fixed batches."""

    #: whether `trials` can score several units of a layer in one pass (see `Staged`)
    can_batch = False
    #: which engine this is (`pruning.engine`'s names): logs, plan metadata and `--dry-run` read it
    kind = "full"

    def __init__(self, model: nn.Module, scorer: ScoringFunction, manifold: Manifold, intervention: Intervention,
                 device="cpu"):
        self.model, self.scorer, self.intervention = model, scorer, intervention
        batches = list(manifold)
        # under torch.distributed each rank scores every world-th batch of S; the scores are
        # gathered and put back in batch order, so every rank sees exactly the single-process
        # arrays (same batches, same per-sample numbers) and reaches the same decisions
        self.rank, self.world = rank_and_world()
        self.batch_ids = list(range(len(batches)))[self.rank::self.world]
        self.batches = [(x.to(device), y.to(device) if torch.is_tensor(y) else y)
                        for x, y in (batches[i] for i in self.batch_ids)]
        self.probe = batches[0][0].to(device) if batches else None  # a batch every rank has
        self.passes = 0  # baselines and trials: passes over S, however deep or short
        self.batch_runs = 0  # batches forwarded; batch_runs / len(batches) counts short trials as fractions

    def _scores(self, outputs: list, targets: list) -> Scores:
        parts = []
        for bid, out, y in zip(self.batch_ids, outputs, targets):
            s = check_scores(self.scorer, self.scorer.score(out, y))  # the scoring contract
            parts.append((bid, np.asarray(s.values, dtype=np.float64), np.asarray(s.groups)))
        if self.world > 1:
            gathered: list = [None] * self.world
            torch.distributed.all_gather_object(gathered, parts)
            parts = sorted((p for rank_parts in gathered for p in rank_parts), key=lambda p: p[0])
        scores = Scores(np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]))
        if not np.isfinite(scores.values).all():
            raise NumericalError(
                f"the scoring function returned {int((~np.isfinite(scores.values)).sum())} NaN/inf "
                "values; check the model weights and the input normalisation"
            )
        return scores

    @property
    def targets(self) -> list:
        return [y for _, y in self.batches]

    def baseline(self) -> Scores:
        return self._forward()

    def trial(self, units: Unit | Sequence[Unit], stop: Stop | None = None, marks: Sequence[int] = ()) -> Scores:
        """Scores with `units` (of one layer) cut, restored afterwards.

        With `stop`, after the first n batches for every n in `marks`, `stop(scores of those
        batches)` may end the trial early: the scores returned are then shorter than S, and
        such a trial cannot be committed.
        """
        with self.intervention.trial(_as_list(units)):
            return self._forward(stop, marks)

    def reference(self, layer: str) -> Scores:
        """sigma of the network as it stands (nothing cut) along the path a trial of `layer`
        takes: what a reduced-precision trial is compared with (cswap/precision.py)."""
        return self._forward()

    @torch.no_grad()
    def _forward(self, stop: Stop | None = None, marks: Sequence[int] = ()) -> Scores:
        """The current network over the batches of S, possibly ending at a mark (see `trial`)."""
        self.passes += 1
        outputs = []
        for b, (x, _) in enumerate(self.batches):
            outputs.append(self.model(x))
            self.batch_runs += 1
            if stop is not None and b + 1 in marks:
                partial = self._scores(outputs, self.targets)
                if stop(partial):
                    return partial
        return self._scores(outputs, self.targets)

    def commit(self, units: Unit | Sequence[Unit]) -> None:
        """`units` (those of the last trial) stay cut from now on."""
        self.intervention.cut_all(_as_list(units))

    def cut(self, unit: Unit) -> None:
        """Cut `unit` for good without a trial (a decision replayed on resume): any cached
        activations are stale until the next `baseline()`."""
        self.intervention.cut(unit)


def _as_list(units: Unit | Sequence[Unit]) -> list[Unit]:
    return [units] if isinstance(units, Unit) else list(units)


class Staged(FullForward):
    """Re-run only what a cut can change, from cached activations of the current network.

    The adapter's stage chain bounds the work: a unit's trial starts at the stage holding
    its first reader C. Inside that stage, every weighted module that runs before C returns
    its cached output instead of recomputing it (its input cannot depend on the cut), and
    with `delta=True` C itself returns cached output minus the cut channel's contribution (a
    rank-one correction costing 1/in_channels of C). Stage inputs and module outputs seen
    during a trial become the cache when the pruner removes that unit. Without `delta`, the
    same modules run in the same order on the same tensors as a full forward: the scores
    are bitwise equal. With it they differ by float32 round-off only.
    """

    _WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    can_batch = True

    def __init__(self, model, scorer, manifold, stages: Sequence[nn.Module], graph: UnitGraph,
                 intervention: Intervention, device="cpu", delta: bool = False):
        super().__init__(model, scorer, manifold, intervention, device)
        self.stages = list(stages)
        self.delta = delta
        self.kind = "delta" if delta else "staged"
        owner = stage_owners(self.stages)
        trace = trace_calls(self.model, self.probe[:1])  # one sample: the order and count of calls
        order, calls, probe_output = trace.order, trace.calls, trace.output
        # modules whose output can be cached: weighted, called once per forward
        self.cacheable = {m for m in order if isinstance(m, self._WEIGHTED) and calls[m] == 1}
        self.stage_modules = [[m for m in sorted(stage.modules(), key=lambda m: order.get(m, -1))
                               if m in self.cacheable] for stage in self.stages]
        self.first_stage: dict[str, int] = {}
        self.first_reader: dict[str, tuple[nn.Module, int, torch.Tensor | None]] = {}
        # every module reading each layer, with the input features it reads per channel
        self.readers: dict[str, list[tuple[nn.Module, int, list[list[int]]]]] = {}
        params = dict(model.named_parameters())
        for layer in graph.layers:
            readers = [(model.get_submodule(Layer.module_of(p)), p, dim, idx) for p, dim, idx in layer.reads]
            self.readers[layer.name] = [(r, dim, idx) for r, _, dim, idx in readers]
            missing = [p for r, p, _, _ in readers if r not in owner]
            if missing:
                raise ValueError(f"stages do not contain the readers of layer {layer.name}: {missing[0]}")
            first = min(readers, key=lambda r: (owner[r[0]], order.get(r[0], 1 << 30)))
            self.first_stage[layer.name] = owner[first[0]]
            self.first_reader[layer.name] = (first[0], first[1], first[3])
        self._originals = {p: params[p].detach().clone() for _, p, _ in self.first_reader.values()} if delta else {}
        self._batchable_output = isinstance(probe_output, torch.Tensor)  # copies are split along its dim 0
        self.inputs: list[list[torch.Tensor]] = []  # per batch: the input of every stage
        self.outputs: list[dict[nn.Module, torch.Tensor]] = []  # per batch: cached module outputs
        self._pending = None

    @torch.no_grad()
    def _run(self, start: int, replace: dict[nn.Module, object] | None = None,
             stop: Stop | None = None, marks: Sequence[int] = (), copies: int = 1, masks=()):
        """Run stages start.. for every batch; in stage `start`, modules in `replace(b)` return
        the given output. Returns outputs, new stage inputs, new module outputs (from start);
        with `stop` (see `FullForward.trial`) possibly for the first batches only. With
        `copies` = k, every batch runs k times stacked along dim 0 (`masks`: pre-hooks that
        make the copies differ)."""
        outputs, inputs, module_outputs = [], [], []
        for b, (x, _) in enumerate(self.batches):
            h = _tile(x if start == 0 else self.inputs[b][start], copies)
            seen: dict[nn.Module, torch.Tensor] = {}
            hooks = [m.register_forward_hook(_recorder(seen)) for i in range(start, len(self.stages))
                     for m in self.stage_modules[i]]
            hooks += [m.register_forward_pre_hook(hook) for m, hook in masks]
            patched = []
            try:
                for m, make in (replace or {}).items():
                    m.forward = _fixed_output(make, b, copies)  # instance attribute shadows the method
                    patched.append(m)
                stage_inputs = []
                for i in range(start, len(self.stages)):
                    stage_inputs.append(h)
                    if i == start + 1:
                        for m in patched:
                            del m.forward
                        patched = []
                    h = self.stages[i](h)
            finally:
                for m in patched:
                    del m.forward
                for hk in hooks:
                    hk.remove()
            outputs.append(h)
            inputs.append(stage_inputs)
            module_outputs.append(seen)
            self.batch_runs += copies
            if stop is not None and b + 1 in marks and stop(self._scores(outputs, self.targets)):
                break
        return outputs, inputs, module_outputs

    def baseline(self) -> Scores:
        self.passes += 1
        outputs, self.inputs, self.outputs = self._run(0)
        return self._scores(outputs, self.targets)

    def reference(self, layer: str) -> Scores:
        self.passes += 1
        start, replace = self._start_and_cached(layer)
        outputs, _, _ = self._run(start, replace)
        return self._scores(outputs, self.targets)

    def trial(self, units: Unit | Sequence[Unit], stop: Stop | None = None, marks: Sequence[int] = ()) -> Scores:
        units = _as_list(units)
        layer = units[0].layer
        if any(u.layer != layer for u in units):
            raise ValueError("a joint trial takes units of one layer")
        self.passes += 1
        start, replace = self._start_and_cached(layer)
        reader, pname, idx_lists = self.first_reader[layer]
        if self.delta and self._delta_ok(reader):
            idx = torch.as_tensor([i for u in units for i in idx_lists[u.channel]], device=self.probe.device)
            replace[reader] = _DeltaOutput(self, reader, self._originals[pname], idx)
        with self.intervention.trial(units):
            outputs, inputs, module_outputs = self._run(start, replace, stop, marks)
        complete = len(outputs) == len(self.batches)
        self._pending = ([units], start, inputs, module_outputs) if complete else None
        return self._scores(outputs, self.targets)

    def batchable(self, layer: str) -> bool:
        """Whether `trials` can evaluate this layer's units together: every reader a plain
        convolution or linear layer reading whole input features, a tensor output, no delta, and
        a cut that only zeroes reads (a compensated cut changes the readers' other weights)."""
        return not self.delta and self.intervention.batchable and self._batchable_output and all(
            dim == 1 and (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))
            for m, dim, _ in self.readers[layer])

    def trials(self, units: Sequence[Unit]) -> list[Scores]:
        """sigma* of each unit cut alone (units of one layer, none cut in the weights), in one
        pass over S with every batch stacked len(units) times.

        Copy j of a batch has the input features through which unit j is read zeroed at every
        reader: the same products as zeroing those weight slices (0 * w instead of x * 0), so
        on kernels whose per-sample result does not depend on the batch size the scores are
        bitwise those of `trial` (the pruner checks this once per analysis). Any of the units
        may then be committed.
        """
        units = list(units)
        layer = units[0].layer
        if any(u.layer != layer for u in units) or not self.batchable(layer):
            raise ValueError(f"units {units[0]}.. cannot be evaluated together")
        k = len(units)
        self.passes += k
        start, replace = self._start_and_cached(layer)
        masks = [(m, _cut_copies(k, [idx[u.channel] for u in units], m, self.probe.device))
                 for m, _, idx in self.readers[layer]]
        outputs, inputs, module_outputs = self._run(start, replace, copies=k, masks=masks)
        self._pending = ([[u] for u in units], start, inputs, module_outputs)
        return [self._scores([out[j * len(x):(j + 1) * len(x)] for out, (x, _) in zip(outputs, self.batches)],
                             self.targets) for j in range(k)]

    def _start_and_cached(self, layer: str) -> tuple[int, dict[nn.Module, object]]:
        """The stage a cut of `layer` starts changing, and the modules of that stage that run
        before the first reader, with their cached outputs (a cut cannot change them)."""
        start = self.first_stage[layer]
        reader = self.first_reader[layer][0]
        reuse = [m for m in self.stage_modules[start] if m is not reader and self._runs_before(m, reader, start)]
        return start, {m: (lambda b, m=m: self.outputs[b][m]) for m in reuse}

    def _runs_before(self, m: nn.Module, reader: nn.Module, stage: int) -> bool:
        mods = self.stage_modules[stage]
        return reader in mods and mods.index(m) < mods.index(reader)

    def _delta_ok(self, reader: nn.Module) -> bool:
        """The rank-one update needs C's cached output and a plain conv or linear layer."""
        if reader not in self.cacheable:
            return False
        if isinstance(reader, nn.Conv2d):
            return reader.groups == 1 and reader.padding_mode == "zeros"
        return isinstance(reader, nn.Linear)

    def commit(self, units: Unit | Sequence[Unit]) -> None:
        units = _as_list(units)
        if self._pending is None or units not in self._pending[0]:
            raise RuntimeError(f"commit({units}) without its complete trial")
        candidates, start, inputs, module_outputs = self._pending
        super().commit(units)
        j, k = candidates.index(units), len(candidates)
        for b, (x, _) in enumerate(self.batches):
            rows = slice(j * len(x), (j + 1) * len(x))  # copy j of a stacked batch (all of it when k = 1)
            self.inputs[b][start + 1:] = [t[rows].clone() if k > 1 else t for t in inputs[b][1:]]
            self.outputs[b].update({m: t[rows].clone() if k > 1 else t for m, t in module_outputs[b].items()})
        self._pending = None


class _DeltaOutput:
    """Output of reader C with one input channel cut: cached C(x) minus that channel's share."""

    def __init__(self, engine: Staged, reader: nn.Module, weight: torch.Tensor, idx: torch.Tensor):
        self.engine, self.reader, self.idx = engine, reader, idx
        self.weight = weight.index_select(1, idx)

    def __call__(self, b: int, x: torch.Tensor) -> torch.Tensor:
        cached = self.engine.outputs[b][self.reader]
        r = self.reader
        if isinstance(r, nn.Linear):
            share = x.index_select(-1, self.idx) @ self.weight.t()
        else:
            share = nn.functional.conv2d(x.index_select(1, self.idx), self.weight, None, r.stride, r.padding,
                                         r.dilation)
        return cached - share


def _fixed_output(make, b: int, copies: int = 1):
    if isinstance(make, _DeltaOutput):
        return lambda x: make(b, x)
    # a copy: in-place ops after it must not touch the cache
    return lambda *args, **kwargs: _tile(make(b), copies) if copies > 1 else make(b).clone()


def _tile(t: torch.Tensor, copies: int) -> torch.Tensor:
    """`copies` copies of a batch stacked along dim 0 (the batch itself when copies = 1)."""
    return t if copies == 1 else t.repeat(copies, *([1] * (t.dim() - 1)))


def _cut_copies(copies: int, features: Sequence[Sequence[int]], reader: nn.Module, device):
    """Forward pre-hook zeroing, in copy j of a stacked batch, the input features `features[j]`
    of `reader` (a Conv2d reads them on dim 1, a Linear on the last dim). A new tensor: the
    input may also flow elsewhere (a residual path) and must stay intact there."""
    width = reader.in_features if isinstance(reader, nn.Linear) else reader.in_channels
    cut_away = torch.zeros(copies, width, dtype=torch.bool)
    for j, idx in enumerate(features):
        cut_away[j, list(idx)] = True
    cut_away = cut_away.to(device)  # once, not on every call

    def hook(module, args):
        x = args[0]
        stacked = x.view(copies, x.shape[0] // copies, *x.shape[1:])
        shape = [copies] + [1] * (x.dim())
        shape[-1 if isinstance(reader, nn.Linear) else 2] = width
        cut = stacked.masked_fill(cut_away.view(shape), 0.0)
        return (cut.view(x.shape), *args[1:])
    return hook


def _recorder(store: dict):
    def hook(module, args, output) -> None:
        store[module] = output.clone()  # in-place ops downstream (ReLU(inplace)) must not alter it
    return hook


def stage_owners(stages: Sequence[nn.Module]) -> dict[nn.Module, int]:
    """Each module of the chain -> the index of the first stage that holds it."""
    owner: dict[nn.Module, int] = {}
    for i, stage in enumerate(stages):
        for m in stage.modules():
            owner.setdefault(m, i)
    return owner


def first_stage(layer: Layer, model: nn.Module, owners: dict[nn.Module, int]) -> int:
    """The first stage holding a reader of `layer`: where a trial of its units starts."""
    return min((owners.get(model.get_submodule(name), 0) for name in layer.readers()), default=0)


def stage_chain(kind: str, stages: Sequence[nn.Module] | None, model: nn.Module,
                probe: torch.Tensor) -> list[nn.Module] | None:
    """The stages an engine of `kind` runs over `model` (the adapter's `stages`), or None for
    full forward passes: `full` never stages; `staged` and `delta` need a chain that
    reproduces the forward exactly; `auto` uses one if it does (checked on `probe`)."""
    if kind not in ENGINES:
        raise ValueError(f"unknown engine {kind!r}; use one of {', '.join(ENGINES)}")
    if kind == "full" or stages is None:
        if kind in ("staged", "delta"):
            raise ConfigError(f"engine {kind} needs an adapter with a stage chain; this model's has none: use engine "
                              "auto or full")
        return None
    stages = list(stages)
    with torch.no_grad():
        h = probe
        for stage in stages:
            h = stage(h)
        same = torch.equal(h, model(probe))
    if same:
        return stages
    if kind != "auto":
        raise ConfigError(f"engine {kind}: the adapter's stages do not reproduce the model's forward exactly; use "
                          "engine auto or full")
    log.warning("stage chain differs from the forward; using full forward passes")
    return None


def make_engine(kind: str, model, scorer, manifold, graph, stages=None, device="cpu",
                intervention: Intervention | None = None) -> FullForward:
    """`staged` (bitwise equal to full forwards) when asked or when `auto` finds a stage
    chain that reproduces the forward (`stage_chain`); `delta` adds the rank-one update of the
    first reader. The engine cuts units with `intervention` (default: zeroed reads over
    `model`); `cswap.options.AnalysisOptions` refuses delta with a compensated cut."""
    intervention = intervention or Intervention(model, graph)
    probe = next(iter(manifold))[0].to(device)
    chain = stage_chain(kind, stages, model, probe)
    if chain is None:
        return FullForward(model, scorer, manifold, intervention, device)
    return Staged(model, scorer, manifold, chain, graph, intervention, device, delta=(kind == "delta"))
