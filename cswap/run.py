"""`cswap prune`: one analysis from a config to a run directory.

The run is assembled in `<run>.partial/` and renamed to `<run>/` only after the pruned model
passed its self-check and every file is written, so a directory without the suffix is
always complete, and a failed run leaves only a `.partial` folder with its log. Everything
is built and validated (`prepare`) before anything is created, so bad input leaves nothing;
the directory's lock and life cycle are `cswap.rundir`'s; SIGINT/SIGTERM save the state.
"""
from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from . import rundir
from .build import analysis_from_config, analysis_from_parts, parts_from_config
from .collapse import collapse
from .config import RunConfig, dump_config
from .coverage import check_coverage
from .distributed import is_main_process
from .errors import ConfigError, CSwapError, DataError, ModelError, OutputError, RunInterrupted
from .files import json_text, save_state_dict_atomic, write_native, write_text_atomic
from .interfaces import Analysis, Manifold
from .interrupt import deferred, interruptible
from .metrics import compare_costs
from .plan import PruningPlan
from .power import dry_run_lines, judgement
from .pruned_record import PrunedRecord
from .pruner import progressive_prune
from .removal import count_params
from .replay import ReplayData, prune, replay_steps
from .rundir import STATE_FILE, RunLock, partial_of

log = logging.getLogger("cswap")


def default_run_dir(cfg: RunConfig) -> Path:
    """`<output.dir>/<name>-<time>-<random>`: two runs started in the same second get two
    directories (the lock would refuse the second one otherwise)."""
    return cfg.output.dir / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


PROBE_SIDE = 128  # --dry-run traces and checks units on at most this many pixels a side (estimate.shrunk_inputs)


def describe(cfg: RunConfig) -> str:
    """What `--dry-run` prints: the model, its units, and what would run."""
    a, note = analysis_from_config(cfg, random_if_missing=True, on_device=False,  # every plugin's options validated
                                   probe_side=PROBE_SIDE)
    graph, x = a.units, a.example_inputs
    lines = [
        f"model      {cfg.model.source}:{cfg.model.name}  ({count_params(a.model):,} parameters; {note})",
        f"task       {cfg.task.name}  example input {tuple(x.shape)}",
        f"adapter    {a.adapter_name}",
        f"scorer     {(cfg.scorer.name if cfg.scorer else a.task.default_scorer)}",
        f"test       {(cfg.test.name if cfg.test else a.task.default_test)} {cfg.test.options if cfg.test else ''}",
        f"units      {graph.num_units} in {len(graph.layers)} layers (output to input):",
    ]
    lines += [f"  {layer.name:<40} {layer.channels:>6}" for layer in graph.layers]
    lines += [f"  not pruned: {name}: {why}" for name, why in graph.skipped.items()]
    lines += [f"  not checked (kept): {name}: {why}" for name, why in graph.unverified.items()]
    target = cfg.pruning.target
    fast = cfg.pruning.fast
    modes = [name for name in ("group_testing", "sequential", "taylor_order") if getattr(fast, name)]
    lines.append((f"would run  fast modes {', '.join(modes)} on {graph.num_units} units (the plan may differ from the "
                  "exact one)" if modes else f"would run  one forward pass over S per unit ({graph.num_units} units)")
                 + (f", then replay to {target.describe()}" if target.kind else ", then remove non-critical units"))
    from .estimate import estimate

    if tuple(graph.input_shape) != tuple(x.shape[1:]):
        lines.append(f"traced     units traced and checked on a {tuple(graph.input_shape)} input, not {tuple(x.shape[1:])}: "
                     "a CNN's units do not depend on the image size")
    traced = torch.zeros((1, *graph.input_shape), dtype=x.dtype)
    probe = estimate(a, cfg.seed, traced)
    lines += probe.lines()  # |S|, engine, trials, a probe pass and the time it implies
    lines += dry_run_lines(a, cfg.seed)  # the test's minimum detectable effect on S, and its warning
    if target.kind == "quality":
        lines.append(_quality_estimate(a, target, probe, cfg.seed))
    return "\n".join(lines)


def _quality_estimate(a: Analysis, target, probe, seed: int) -> str:
    """The quality search's cost, before the run: at most `replays_at_most(units)` replays, each
    a pass over the validation data and, with recovery, about one pass over the calibration
    data per layer, timed by the probe's seconds per sample. The validation data is drawn as
    the run draws it, so a task that cannot give it is refused here too, not minutes later."""
    from .estimate import _duration
    from .quality_search import replays_at_most

    data = ReplayData.drawn(a.task, seed, None, target)  # refusals: cswap.replay.validation_for
    validation = data.validation
    per_sample = probe.probe.seconds / max(probe.probe.samples, 1)
    refits = len(a.units.layers) * len(data.calibration) if target.recovery.methods else 0
    passes = len(validation) + refits
    replays = replays_at_most(a.units.num_units)
    return (f"quality    search by replay: at most {replays} replays, each on {len(validation)} validation samples "
            f"({target.validation_per_class} per class): about {_duration(replays * passes * per_sample)} after "
            "the analysis")


def self_check(cut_model: nn.Module, pruned: nn.Module, batch: torch.Tensor) -> float:
    """Max |pruned - intervened| on a batch of S; the two must agree (removal == cut). The
    intervened model is the replay's cut model: the unpruned architecture with the same cuts,
    compensations and repairs (`cswap.replay`)."""
    with torch.no_grad():
        a, b = cut_model.eval()(batch), pruned.eval()(batch)
    diff = (a - b).abs().max().item()
    scale = max(a.abs().max().item(), 1.0)
    if not diff <= 1e-4 * scale:
        raise ModelError(
            f"self-check failed: the pruned model's outputs differ from the intervened model's by {diff:.3g}; "
            "nothing was saved as complete (please report this with the run's log)"
        )
    return diff


def _from_rank0(action):
    """Run `action` on rank 0 only and give every rank its result, or its refusal (a locked
    or non-empty directory) as an error, so no rank is left waiting in a collective."""
    result, error = None, None
    if is_main_process():
        try:
            result = action()
        except CSwapError as exc:
            error = exc
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [None if error else result, None if error is None else str(error)]
        dist.broadcast_object_list(box, src=0)
        if box[1] is not None and error is None:
            raise OutputError(box[1])
        result = box[0] if error is None else result
    if error is not None:
        raise error
    return result


def _resume_dirs(resume: str | Path) -> tuple[Path, Path]:
    resume = Path(resume)
    final = resume.with_name(resume.name[: -len(".partial")]) if resume.name.endswith(".partial") else resume
    partial = partial_of(final)
    if final.exists() and (final / "report.json").exists():
        raise CSwapError(f"run {final} is already complete; nothing to resume")
    if not (partial / "config.yaml").is_file():
        raise CSwapError(f"no interrupted run at {partial} (expected {partial / 'config.yaml'})")
    return final, partial


def _check_same_config(cfg: RunConfig, partial: Path) -> None:
    import difflib

    stored, given = (partial / "config.yaml").read_text(), dump_config(cfg)
    if stored != given:
        diff = "".join(difflib.unified_diff(stored.splitlines(True), given.splitlines(True),
                                            f"{partial}/config.yaml", "this config"))
        raise ConfigError(f"the config differs from the run being resumed; refusing to mix them:\n{diff}")


def _target(cfg: RunConfig, run_dir, resume, force: bool) -> Path:
    """The run directory, checked without creating anything: for a resume its `.partial`
    and config; for a new run that it can be created and holds no recorded work."""
    if resume is not None:
        final, partial = _resume_dirs(resume)
        if run_dir is not None and Path(run_dir) not in (final, partial):
            raise ConfigError(f"--resume continues {partial} in place; --out {run_dir} names another directory "
                              "(give one of the two)")
    else:
        final = Path(run_dir) if run_dir else default_run_dir(cfg)
    if is_main_process():  # a run still going is not an interrupted one: say so first
        RunLock(final).probe()
    if resume is not None:
        _check_same_config(cfg, partial)
        rundir.read_state(partial)
    else:
        rundir.check_target(final)
        work = rundir.recorded_work(partial_of(final))
        if work and not force:
            raise OutputError(f"{partial_of(final)} holds {work} of an interrupted run; continue it with "
                              f"--resume {partial_of(final)}, or pass --force to discard it")
    return final


@dataclass
class Setup:
    """What `prepare` built: every object of the run, validated, nothing written yet."""

    analysis: Analysis
    note: str
    manifold: Manifold
    before: dict = field(default_factory=dict)
    validation: Manifold | None = None  # a quality target's (`Task.validation`), drawn before anything exists


def prepare(cfg: RunConfig, evaluate: bool = True) -> Setup:
    """Build and check everything before the run directory exists: options (pydantic),
    model and checkpoint, data, units, the classes S covers, the original model's metrics.
    Any bad input fails here and leaves nothing behind."""
    parts = parts_from_config(cfg)
    manifold = parts.task.manifold(cfg.seed)  # the data first: checked in seconds, before the units (minutes)
    if len(manifold) == 0:
        raise DataError("the sample set S is empty")
    check_coverage(parts.task, manifold, parts.model, parts.example_inputs)
    a, note = analysis_from_parts(parts, cfg), parts.note
    if not a.units.layers:
        raise ModelError("the model has no prunable units: " + "; ".join(f"{n}: {w}" for n, w in a.units.skipped.items()))
    target, validation = cfg.pruning.target, None
    if target.kind == "quality":  # too few samples, or a task that cannot measure it: refused now
        validation = ReplayData.drawn(a.task, cfg.seed, None, target, manifold).validation
    before = a.task.evaluate(a.model, a.device) if evaluate else {}
    return Setup(a, note, manifold, before, validation)


def _open(final: Path, cfg: RunConfig, resume, force: bool) -> tuple[RunLock, dict | None]:
    """Rank 0: take the lock, then create the `.partial` (new run) or re-read its state
    (resume) under it. Returns the lock and the state to replay."""
    lock = RunLock(final).acquire()
    try:
        partial = partial_of(final)
        if resume is None:
            rundir.open_partial(final, dump_config(cfg), force)
            return lock, None
        if not (partial / "config.yaml").is_file():
            raise OutputError(f"{partial} disappeared before it could be resumed")
        rundir.remove_leftover_temporaries(partial)
        return lock, rundir.read_state(partial)
    except BaseException:
        lock.release()
        raise


def run_prune(cfg: RunConfig, run_dir: str | Path | None = None, progress: bool = True,
              resume: str | Path | None = None, force: bool = False) -> Path:
    """Run C-SWAP as configured and write the run directory; returns its path.

    `resume` names an interrupted run (`<run>` or `<run>.partial`): its config must equal
    `cfg`, its recorded decisions are replayed and the analysis continues where it stopped.
    A new run refuses a `.partial` holding recorded decisions unless `force`. SIGINT and
    SIGTERM raise `RunInterrupted` (state saved; its `partial` says what to resume).
    """
    main = is_main_process()
    final = _target(cfg, run_dir, resume, force)
    partial = partial_of(final)
    try:
        with interruptible():
            if resume is not None and _from_rank0(lambda: rundir.recorded_work(partial) is not None
                                                  and all((partial / n).is_file() for n in rundir.COMPLETE)):
                if main:  # killed after its last file, before the rename: nothing to redo
                    with RunLock(final):
                        rundir.finish(partial, final)
                return final
            setup = prepare(cfg, evaluate=main)
            held: dict = {}

            def open_here():  # rank 0; the other ranks get the state to replay, never the lock
                held["lock"], state = _open(final, cfg, resume, force)
                return state

            state = _from_rank0(open_here)
            lock = held.get("lock")
            try:
                with _run_log(partial if main else None, state):
                    report = _run(cfg, setup, partial if main else None, progress and main, state)
                    if main:
                        write_text_atomic(partial / "report.json", json_text(report))
                if main:
                    rundir.finish(partial, final)
            except CSwapError:  # (an interruption is not one: its state is kept to resume)
                if main and resume is None:
                    rundir.discard_unfinished(partial)  # bad input found mid-run: nothing half-written stays
                raise
            finally:
                if lock is not None:
                    lock.release()
    except RunInterrupted as exc:
        exc.partial = partial if partial.is_dir() else None
        raise
    return final


@contextlib.contextmanager
def _run_log(partial: Path | None, state: dict | None):
    """log.txt of the run for the block; a failure is written there (the traceback too for
    anything that is not a CSwapError), never echoed to the console: the CLI prints one line."""
    if partial is None:
        yield
        return
    handler = logging.FileHandler(partial / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    if state is not None:
        log.info("resuming %s: %d decisions recorded", partial, len(state["decisions"]))
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, RunInterrupted):
            msg, args, info = "interrupted by %s; state saved in %s (resume with --resume %s)", (exc, partial, partial), None
        else:
            plain = isinstance(exc, CSwapError)
            msg, args, info = "run failed: %s", (exc,), None if plain else (type(exc), exc, exc.__traceback__)
        handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, msg, args, info))
        raise
    finally:
        log.removeHandler(handler)
        handler.close()


def _run(cfg: RunConfig, setup: Setup, out: Path | None, progress: bool, resume: dict | None = None) -> dict:
    """The analysis on every rank; replay, self-check and files only where `out` is given
    (rank 0)."""
    started = time.perf_counter()
    a, manifold = setup.analysis, setup.manifold
    model, graph = a.model, a.units
    log.info("model %s:%s, %s", cfg.model.source, cfg.model.name, setup.note)
    log.info("%d units in %d layers; |S| = %d", graph.num_units, len(graph.layers), len(manifold))
    latest: dict = {}

    def checkpoint(state: dict) -> None:
        latest["state"] = state  # holds the pruner's growing decision list: saved again on the way out
        write_text_atomic(out / STATE_FILE, json.dumps(state) + "\n")

    analysis_started = time.perf_counter()
    try:
        ranking = progressive_prune(replace(a, progress=progress), cfg.seed, manifold=manifold, checkpoint=checkpoint if out else None,
                                    checkpoint_seconds=cfg.output.checkpoint_seconds, resume=resume)
        plan = PruningPlan.from_analysis(a, ranking)
    except BaseException:
        if out is not None and "state" in latest:
            _save_last_state(out, latest["state"])
        raise
    analysis_seconds = time.perf_counter() - analysis_started
    if out is None:
        return {}
    plan.save(out / "plan.json")
    report = _deploy(cfg, setup, plan, out, progress)
    totals = latest.get("state", {})  # cumulative over every segment of a resumed run (cswap/pruner/record.py)
    report.update(analysis_seconds=round(max(totals.get("analysis_seconds", 0.0), analysis_seconds), 3),
                  analysis_passes=totals.get("passes"), total_seconds=round(time.perf_counter() - started, 3))
    return report


def _deploy(cfg: RunConfig, setup: Setup, plan: PruningPlan, out: Path, progress: bool) -> dict:
    """The plan replayed to the configured target (`cswap.replay`), checked against its cut
    model, measured beside the original, and saved with its record (`pruned.json`)."""
    a, manifold, device = setup.analysis, setup.manifold, setup.analysis.device
    model, target = a.model, cfg.pruning.target
    data = ReplayData.for_task(a.task, plan, target, sample_set=manifold, validation=setup.validation)
    replayed = prune(plan, model, target, data, adapter=a.adapter, graph=a.units, latency_cache=out,
                     latency_backend=cfg.output.latency_backend, keep_cut=True, progress=progress)
    pruned = replayed.model
    diff = self_check(replayed.cut, pruned, manifold.batches[0][0][:64].to(device))
    before, after = dict(setup.before), a.task.evaluate(pruned, device)
    # timed in turns, so the two latencies see the same machine load, in the runtime users deploy with
    costs = compare_costs([model, pruned], a.example_inputs.to(device), repeats=cfg.output.latency_repeats,
                          batch=cfg.output.report_batch, backend=cfg.output.latency_backend, threads=cfg.threads)
    before.update(costs[0])
    after.update(costs[1])
    save_state_dict_atomic(pruned.state_dict(), out / "pruned_model.pt")
    PrunedRecord.of(plan, replayed.steps, target, cfg.model.model_dump(mode="json")).save(out)
    write_native(pruned, out)  # e.g. an mmseg checkpoint and config beside it
    report = {
        "model": f"{cfg.model.source}:{cfg.model.name}", "metric": a.task.metric, "adapter": a.adapter_name,
        "scorer": plan.scorer, "test": plan.test, "target": target.model_dump(mode="json"),
        "intervention": plan.intervention, "steps_applied": replayed.steps,
        "categories": plan.category_counts(), "units_total": a.units.num_units, "units_removed": len(replayed.units),
        "before": before, "after": after,
        "params_removed_ratio": 1 - after["params"] / before["params"],
        "macs_removed_ratio": 1 - after["macs"] / before["macs"],
        "self_check_max_abs_diff": diff,
    }
    # what the test could see on S, and what it could not judge (cswap/power.py)
    report["judgement"] = judgement(a, manifold, plan, replayed.units)
    # a bottleneck left below its floor, or a model near chance on S, named (cswap/collapse.py)
    report["collapse"] = collapse(plan, replayed.units, a.task, model, a.units, pruned, manifold, device)
    if replayed.search is not None and target.kind == "quality":
        report["quality"] = _quality_section(a, target, replayed.search, pruned, report, out)
    elif replayed.search is not None:
        report["latency_search"] = replayed.search
    if "quality" not in report and a.task.measures_outcomes and a.task.per_class_metric:
        report["per_class"] = _per_class_section(a, target, pruned, report["params_removed_ratio"], out)
    if replayed.recovery is not None:  # what the repair did: the metric of the same removal without it
        unrepaired = replay_steps(plan, model, replayed.steps, target.to(recovery="none"), data, adapter=a.adapter)
        report["recovery"] = {**replayed.recovery.to_json(), a.task.metric + "_before": a.task.evaluate(
            unrepaired.model, device)[a.task.metric]}
    return report


def _quality_section(a: Analysis, target, search: dict, pruned: nn.Module, report: dict, out: Path) -> dict:
    """What a quality target chose, checked on validation data, measured on the test split at
    the chosen point (never used to choose), per class; with its two plots in the run directory."""
    from .quality_search import quality_report
    from .reports import plot_class_metrics, plot_quality_search

    before, after = a.task.outcomes(a.model, a.device), a.task.outcomes(pruned, a.device)
    speedup = report["before"]["latency_ms_batch1"] / report["after"]["latency_ms_batch1"]
    section = quality_report(search, target, before, after, report["params_removed_ratio"], speedup)
    plot_class_metrics(section, a.task.metric, out / "class_metrics.png")
    plot_quality_search(section, a.task.metric, out / "quality_search.png")
    return section


def _per_class_section(a: Analysis, target, pruned: nn.Module, removed: float, out: Path) -> dict:
    """Every class's metric before and after on the test split, and the class that dropped most
    (`cswap.quality.class_report`: the mean hides a class that pruning wrecked), with
    class_metrics.png in the run directory; a quality target's section carries the same."""
    from .quality import class_report
    from .reports import plot_class_metrics

    section = class_report(a.task.outcomes(a.model, a.device), a.task.outcomes(pruned, a.device))
    plot_class_metrics({"test": section, "target": target.describe(), "params_removed_ratio": removed},
                       a.task.metric, out / "class_metrics.png")
    return section


def _save_last_state(out: Path, state: dict) -> None:
    """The decisions made since the last periodic checkpoint, written once more when the
    analysis stops early (a signal, an error); signals wait until the write is done."""
    try:
        with deferred():
            write_text_atomic(out / STATE_FILE, json.dumps(state) + "\n")
    except CSwapError as exc:  # e.g. the disk is full: the previous checkpoint stays
        log.warning("could not save the last decisions: %s", exc)
