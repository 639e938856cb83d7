"""`progressive_prune`: Algorithm 1 on a copy of the model, from the analysis to a ranking.

It sets up the parts the loop needs (`Trials`, `Record`, `Walk`), runs the exact loop or the
opt-in group-testing one, and assembles the ranking the plan is made from. When the device
runs out of memory it starts again with half the batch size, replaying the decisions made so
far instead of recomputing them.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import replace

import torch

from ..errors import ResourceError
from ..interfaces import Analysis, Manifold, Ranking
from ..precision import exact_fp32
from ..tail_order import kept_tail
from .algorithm import algorithm1
from .fast import group_testing
from .record import Record
from .trials import Trials
from .walk import Walk

log = logging.getLogger("cswap")


def progressive_prune(analysis: Analysis, seed: int, *, manifold: Manifold | None = None,
                      samples_per_class: int | None = None, checkpoint=None, checkpoint_seconds: float = 2.0,
                      resume: dict | None = None) -> Ranking:
    """Run Algorithm 1 on a copy of `analysis.model` (which is not changed) and return its
    ranking: the removed units in order, then the critical ones in `critical_order`.

    S is `manifold` (drawn with `samples_per_class`, None: the task's own M_k), or the task's
    for `seed`; the seed also orders the units of each layer. The ranking records how S was
    drawn and how units were cut, so a replay repeats both.
    `checkpoint(state)` receives every decision so far, at most every `checkpoint_seconds`
    and after each layer; `resume=state` replays those decisions (removed units are cut
    again, no test is re-run), recomputes sigma once, and continues, so a resumed run gives
    the plan an uninterrupted run would. Fast modes (`options.fast`) do not resume.
    """
    recorded = list((resume or {}).get("decisions", []))
    if recorded and analysis.options.fast.enabled:
        log.warning("fast modes do not resume; the analysis starts again")
        recorded = []
    manifold = manifold if manifold is not None else analysis.task.manifold(seed, samples_per_class)
    spent = {k: (resume or {})[k] for k in ("analysis_seconds", "passes") if recorded and k in (resume or {})}
    while True:
        record = Record(recorded, checkpoint, checkpoint_seconds, spent)
        try:
            with exact_fp32(analysis.device):  # the baseline and every fp32 trial (cuDNN would use TF32)
                ranking = _walk(analysis, seed, manifold, record)
                return replace(ranking, seed=seed, samples_per_class=samples_per_class or analysis.task.samples_per_class,
                               intervention=analysis.options.intervention, ridge=analysis.options.ridge)
        except torch.OutOfMemoryError as exc:
            recorded = list(record.decisions) if len(record.decisions) > len(recorded) else recorded
            manifold = _halved(manifold, exc)


def _walk(analysis: Analysis, seed: int, manifold: Manifold, record: Record) -> Ranking:
    started = time.perf_counter()
    trials = Trials(analysis, manifold)
    walk = Walk(analysis, trials, record, seed)
    record.passes = lambda: trials.engine.passes
    _announce(walk, analysis, manifold, trials.engine)
    fast = analysis.options.fast
    try:
        if fast.group_testing:
            group_testing(walk, analysis.units.layers, fast)
        else:
            algorithm1(walk, analysis.units.layers)
    finally:
        walk.progress.close()
    meta = {"samples": int(len(trials.base.values)), "categories": record.counts()}
    meta["units_tested"] = record.tested()
    if analysis.options.precision != "fp32":  # reduced-precision trials (cswap/precision.py); fp32 adds nothing
        meta["precision"] = analysis.options.precision
    if fast.enabled:  # unit-forward passes: trials, and trials counted by the share of S they ran
        meta["fast"] = {**fast.model_dump(), "trials": trials.count,
                        "trial_sample_passes": round(trials.batches / max(1, len(trials.engine.batches)), 3)}
    engine, speculation = trials.engine, trials.speculation
    log.info("analysis (%s engine): %d passes over S in %.1f s%s", engine.kind, engine.passes,
             time.perf_counter() - started, speculation.summary() if speculation and speculation.k > 1 else "")

    def tail(removed, critical):  # the kept tail's order, and what the plan records of it
        ordered, recorded = kept_tail(analysis.options, analysis.model, analysis.units, removed, critical,
                                      lambda s: -s.xi)
        meta.update(recorded)
        return ordered

    return record.ranking(meta, tail)


def _announce(walk: Walk, analysis: Analysis, manifold: Manifold, engine) -> None:
    """|S| and the engine, in the log and on the console above the progress bar (not --quiet)."""
    precision = analysis.options.precision
    text = (f"analysis: {analysis.units.num_units} units in {len(analysis.units.layers)} layers, "
            f"|S| = {len(manifold)} samples, {engine.kind} engine" + (f", {precision} trials" if precision != "fp32" else ""))
    log.info(text)
    walk.progress.note(text)


def _halved(manifold: Manifold, exc: BaseException) -> Manifold:
    size = max(len(t) for _, t in manifold)
    if size <= 1:
        raise ResourceError(f"out of memory even with one sample per batch: {exc}") from exc
    msg = f"out of memory with batches of {size} samples; retrying with {(size + 1) // 2}"
    log.warning(msg)
    warnings.warn(msg)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return manifold.rebatched((size + 1) // 2)
