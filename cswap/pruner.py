"""Algorithm 1: progressive C-SWAP.

Layers are visited from the output to the input. Each unit is cut, sigma* is computed on
the whole sample set S, and the significance test decides. A non-critical unit (neutral or
detrimental) is removed at once, and its sigma* becomes the baseline sigma for the next unit:
the network has changed, and that is exactly the new network's sigma, so no extra pass is
needed. Critical units are kept with their xi; they form the tail of the plan, least
beneficial (largest xi) first, to be removed only when a target ratio asks for it.

Removal during the analysis is by intervention (zeroed reads), which equals physical
removal (tested), so the model is never re-traced; the plan is replayed physically at the end.
"""
from __future__ import annotations

import copy
import logging
import time
import warnings
from collections import Counter, deque
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .causal import CRITICAL
from .engine import FullForward, make_engine
from .errors import ConfigError, ResourceError
from .fast import FastOptions, GroupSizer, clearly_critical, interim_test, stratified, taylor_estimates
from .interfaces import Decision, Manifold, Scores, ScoringFunction, SignificanceTest
from .plan import CRITICAL_RANKED, PROGRESSIVE, PlanStep, PruningPlan
from .units import Intervention, Unit, UnitGraph

log = logging.getLogger("cswap")


def progressive_prune(model: nn.Module, graph: UnitGraph, manifold: Manifold, scorer: ScoringFunction,
                      test: SignificanceTest, **kwargs) -> PruningPlan:
    """Algorithm 1 (see `_progressive`), restarted with half the batch size when the device
    runs out of memory: the decisions made so far are replayed, not recomputed."""
    user_checkpoint = kwargs.pop("checkpoint", None)
    state = {"decisions": list((kwargs.pop("resume", None) or {}).get("decisions", []))}

    def keep(s: dict) -> None:
        state["decisions"] = list(s["decisions"])
        if user_checkpoint:
            user_checkpoint(s)

    while True:
        try:
            return _progressive(model, graph, manifold, scorer, test, checkpoint=keep, resume=state, **kwargs)
        except torch.OutOfMemoryError as exc:
            size = max(len(t) for _, t in manifold)
            if size <= 1:
                raise ResourceError(f"out of memory even with one sample per batch: {exc}") from exc
            manifold = manifold.rebatched((size + 1) // 2)
            msg = f"out of memory with batches of {size} samples; retrying with {(size + 1) // 2}"
            log.warning(msg)
            warnings.warn(msg)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _progressive(
    model: nn.Module,
    graph: UnitGraph,
    manifold: Manifold,
    scorer: ScoringFunction,
    test: SignificanceTest,
    *,
    adapter: str,
    seed: int = 0,
    shuffle_units: bool = True,
    device: torch.device | str = "cpu",
    progress: bool = True,
    stages: Callable[[nn.Module], Sequence[nn.Module] | None] | None = None,
    engine: str = "auto",
    checkpoint: Callable[[dict], None] | None = None,
    checkpoint_seconds: float = 2.0,
    resume: dict | None = None,
    fast: FastOptions | None = None,
    unit_batch: int | str = 1,
) -> PruningPlan:
    """Run Algorithm 1 on a copy of `model` and return its plan (the model is not changed).

    `stages(model)` (an adapter's stage chain) lets the engine re-run only the part of the
    network after each cut; the plan is the same either way.

    Crash safety: `checkpoint(state)` is called with every decision so far, at most every
    `checkpoint_seconds` and after each layer; `resume=state` replays those decisions
    (removed units are cut again, no test is re-run), recomputes sigma once, and continues.
    Unit orders come from the seed, so a resumed run visits the same units in the same order
    and yields the plan an uninterrupted run would.

    `fast` turns on the opt-in shortcuts of `cswap.fast` (group testing, sequential tests,
    Taylor ordering); their plans can differ from the exact one, and they do not resume.

    `unit_batch` = k > 1 evaluates the next k units of a layer in one pass on a k times
    larger batch (`Staged.trials`), speculatively: results are used in order, and once a unit
    is removed the results computed for the old network are thrown away and recomputed, so
    the plan is Algorithm 1's exactly. `auto` sizes k from free device memory (CUDA only; on
    CPU per-sample throughput does not grow with the batch, see docs/results/performance.md).
    """
    started = time.perf_counter()
    fast = fast or FastOptions()
    if fast.enabled and unit_batch not in (1, "auto"):
        raise ConfigError("pruning.unit_batch batches exact single-unit trials; "
                          "it cannot be combined with pruning.fast")
    work = copy.deepcopy(model).to(device).eval()
    cut = Intervention(work, graph)
    marks: list[int] = []
    if fast.sequential:  # parts of S that each hold every class, looked at in turn
        manifold, marks = stratified(manifold, fast.looks)
        interim = interim_test(test, fast.interim_alpha)
    sigma_of = make_engine(engine, work, scorer, manifold, graph, stages(work) if stages else None, device)
    if fast.sequential and sigma_of.world > 1:
        raise ConfigError("sequential testing runs in one process; drop torchrun or pruning.fast.sequential")
    base = sigma_of.baseline()
    speculate = Speculation(sigma_of, unit_batch, device) if not fast.enabled else None
    rng = np.random.default_rng(seed)
    recorded = list((resume or {}).get("decisions", []))
    if fast.enabled and recorded:
        log.warning("fast modes do not resume; the analysis starts again")
        recorded = []
    sizer = GroupSizer(fast.group_size, fast.max_group_size) if fast.group_testing else None
    stale_base = bool(recorded)  # after a replay, sigma must be recomputed once
    decisions: list[dict] = []
    removed: list[PlanStep] = []
    critical: list[PlanStep] = []
    protected: dict[str, str] = {}
    categories: Counter = Counter()
    trials = {"count": 0, "batches": 0}
    last_save = time.perf_counter()

    def save(force: bool = False) -> None:
        nonlocal last_save
        if checkpoint and (force or time.perf_counter() - last_save >= checkpoint_seconds):
            checkpoint({"decisions": decisions})
            last_save = time.perf_counter()

    def trial(block: list, clear: Callable[[Decision], bool]) -> tuple[Scores, Decision]:
        """sigma* with `block` cut, and the test's decision. With sequential testing the trial
        ends at the first look where `clear(decision at the interim level)` holds; the
        decision returned is then that interim one."""
        seen: list[Decision] = []

        def stop(partial: Scores) -> bool:
            n = len(partial.values)
            seen.append(clearly_critical(test, interim, base.values[:n], partial.values, base.groups[:n],
                                         fast.interim_alpha))
            return clear(seen[-1])

        before = sigma_of.batch_runs
        with cut.trial(block):
            star = sigma_of.trial(block, stop if fast.sequential else None, marks)
        trials["count"] += 1
        trials["batches"] += sigma_of.batch_runs - before
        if len(star.values) < len(base.values):
            return star, seen[-1]
        return star, test.decide(base.values, star.values[None, :], base.groups)[0]

    def record(unit: Unit, d: Decision | PlanStep, **extra) -> PlanStep:
        step = d if isinstance(d, PlanStep) else PlanStep(unit, PROGRESSIVE, d.category, d.xi, p_values=d.p_values)
        categories[step.category] += 1
        decisions.append({"unit": str(unit), "category": step.category, "xi": step.xi,
                          "p_values": {str(k): v for k, v in step.p_values.items()}, **extra})
        if sizer:
            sizer.record(1, int(not fast.accepts(step.category)))
        return step

    layer_bar = tqdm(graph.layers, desc="layers", unit="layer", disable=not progress)
    for layer in layer_bar:
        layer_bar.set_postfix_str(layer.name)
        units = layer.units()
        if shuffle_units:
            units = [units[i] for i in rng.permutation(len(units))]
        if fast.taylor_order:
            effect = getattr(getattr(test, "options", None), "effect", "relative")
            estimate = taylor_estimates(work, graph, layer.name, manifold, scorer, effect, device)
            units.sort(key=lambda u: abs(estimate[u]))  # stable: ties keep the seeded order
        if sizer:
            sizer.new_layer()
        if speculate:
            speculate.network_changed()  # nothing computed ahead outlives its layer
        remaining = layer.channels
        todo: deque[Unit] = deque(units)
        pending: deque[list[Unit]] = deque()  # halves of blocks that were not jointly neutral
        bar = tqdm(total=len(units), desc=layer.name, unit="unit", leave=False, disable=not progress)
        while todo or pending:
            if remaining == 1:  # a layer cannot lose its last channel
                for unit in [u for block in pending for u in block] + list(todo):
                    protected[str(unit)] = "last unit of its layer (not tested)"
                    categories["untested"] += 1
                    decisions.append({"unit": str(unit), "category": "untested"})
                break
            size = min(sizer.size() if sizer else 1, remaining - 1)  # never the rest of the layer
            block = pending.popleft() if pending else [todo.popleft() for _ in range(min(size, len(todo)))]
            if len(block) > size:  # a half of a split block, larger than the rate now allows
                pending.appendleft(block[size:])
                block = block[:size]

            if len(block) > 1:  # group testing: remove the block if the joint verdict allows, else split it
                star, d = trial(block, lambda d: not fast.accepts(d.category))
                if len(star.values) < len(base.values) or not fast.accepts(d.category):
                    sizer.record(1, 1)  # at least one unit in there that would not be removed alone
                    half = len(block) // 2
                    pending.extendleft([block[half:], block[:half]])  # the first half first
                    continue
                for unit in block:  # every unit gets the block's verdict
                    cut.cut(unit)
                    removed.append(record(unit, d, block=len(block)))
                sigma_of.commit(block)
                base = star
                remaining -= len(block)
                bar.update(len(block))
                save()
                continue

            unit = block[0]
            replay = recorded[len(decisions)] if len(decisions) < len(recorded) else None
            if replay is not None:
                if replay["category"] == "untested" or replay["unit"] != str(unit):
                    raise RuntimeError(f"resume state does not match this analysis at {unit} ({replay['unit']})")
                step = record(unit, PlanStep(unit, PROGRESSIVE, replay["category"], replay["xi"],
                                             p_values={int(k): v for k, v in replay["p_values"].items()}))
            else:
                if stale_base:
                    base, stale_base = sigma_of.baseline(), False  # sigma of the network the replay rebuilt
                if speculate and speculate.applies(layer.name):
                    star = speculate.scores(unit, list(todo), lambda: trial(block, None)[0])
                    d = test.decide(base.values, star.values[None, :], base.groups)[0]
                else:
                    star, d = trial(block, lambda d: d.category == CRITICAL)
                early = len(star.values) < len(base.values)  # stopped at a look: clearly critical
                step = record(unit, d, **({"samples_seen": len(star.values)} if early else {}))
            if step.category == CRITICAL:
                step.phase = CRITICAL_RANKED
                critical.append(step)
            else:
                cut.cut(unit)
                if replay is None:
                    sigma_of.commit(unit)
                    base = star  # sigma of the network with this unit removed: no extra pass
                    if speculate:
                        speculate.network_changed()
                remaining -= 1
                removed.append(step)
            bar.update(1)
            save()
        bar.close()
        save(force=True)
        log.info("%s: %d of %d units removed", layer.name, layer.channels - remaining, layer.channels)

    # least beneficial critical units first: xi closest to zero (stable for ties)
    critical.sort(key=lambda s: -s.xi)
    plan = PruningPlan.build(
        model, graph, removed + critical, method="cswap", adapter=adapter,
        meta={
            "seed": seed,
            "samples": int(len(base.values)),
            "categories": {k: categories.get(k, 0) for k in ("neutral", "detrimental", "critical", "untested")},
            "units_tested": sum(categories[k] for k in ("neutral", "detrimental", "critical")),
            # unit-forward passes: trials, and trials counted by the share of S they ran
            **({"fast": {**fast.model_dump(), "trials": trials["count"],
                         "trial_sample_passes": round(trials["batches"] / max(1, len(sigma_of.batches)), 3)}}
               if fast.enabled else {}),
        },
    )
    plan.protected.update(protected)
    log.info("analysis (%s engine): %d passes over S in %.1f s%s",
             type(sigma_of).__name__, sigma_of.passes, time.perf_counter() - started,
             speculate.summary() if speculate and speculate.k > 1 else "")
    return plan


class Speculation:
    """Scores of single-unit trials computed k at a time for the network as it stands.

    Algorithm 1 tests unit i+1 on the network left after unit i's verdict. While verdicts
    keep units, the network does not change and results computed ahead stay exact; a removal
    changes it, and `network_changed` throws the rest away. The first batched result of an
    analysis is compared bitwise with an ordinary trial of the same unit; if the kernels make
    them differ, batching is switched off and the analysis continues unbatched (warned).
    """

    MAX_AUTO = 16

    def __init__(self, engine: FullForward, unit_batch: int | str, device):
        self.engine = engine
        self.k = self._size(unit_batch, device)
        self.ready: dict[Unit, Scores] = {}
        self.checked = False
        self.stats = {"batches": 0, "units": 0, "thrown_away": 0}

    def _size(self, unit_batch: int | str, device) -> int:
        if unit_batch == "auto":
            if torch.device(device).type != "cuda" or not hasattr(self.engine, "trials"):
                return 1
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return max(1, min(self.MAX_AUTO, int(0.5 * free // max(1, self._cache_bytes()))))
        if not isinstance(unit_batch, int) or unit_batch < 1:
            raise ConfigError(f"pruning.unit_batch must be a positive integer or 'auto', not {unit_batch!r}")
        if unit_batch > 1 and not hasattr(self.engine, "trials"):
            log.warning("unit_batch needs the staged engine; evaluating one unit at a time")
            return 1
        return unit_batch

    def _cache_bytes(self) -> int:
        """Memory of the engine's cached activations of S: a bound on what one more copy holds."""
        tensors = [t for per_batch in self.engine.inputs for t in per_batch]
        tensors += [t for per_batch in self.engine.outputs for t in per_batch.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def applies(self, layer: str) -> bool:
        return self.k > 1 and self.engine.batchable(layer)

    def scores(self, unit: Unit, upcoming: list[Unit], single) -> Scores:
        """sigma* of `unit` alone, from a batch with the next units of its layer if needed.
        `single()` runs the ordinary trial (weights cut), used for the one-time check."""
        if unit in self.ready:
            return self.ready.pop(unit)
        reference = None if self.checked else single()
        block = [unit] + upcoming[:self.k - 1]
        while True:
            try:
                results = self.engine.trials(block)
                break
            except torch.OutOfMemoryError:
                if len(block) == 1:
                    raise
                block = block[:len(block) // 2]
                self.k = len(block)
                log.warning("out of memory evaluating units together; now %d at a time", self.k)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        self.stats["batches"] += 1
        self.stats["units"] += len(block)
        self.ready = dict(zip(block, results))
        if reference is not None:
            self.checked = True
            if not np.array_equal(reference.values, self.ready[unit].values):
                msg = "batched trials differ from single trials in round-off on this device; unit_batch switched off"
                log.warning(msg)
                warnings.warn(msg)
                self.k, self.ready = 1, {}
                return single()
        return self.ready.pop(unit)

    def network_changed(self) -> None:
        self.stats["thrown_away"] += len(self.ready)
        self.ready = {}

    def summary(self) -> str:
        st = self.stats
        return (f"; unit_batch {self.k}: {st['units']} unit trials in {st['batches']} batched passes, "
                f"{st['thrown_away']} thrown away after removals")
