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
from .build import analysis_from_config, build_model, load_weights, resolve_adapter
from .config import RunConfig, dump_config, load_config_text, parse_config
from .coverage import check_coverage
from .distributed import is_main_process
from .errors import ConfigError, CSwapError, DataError, ModelError, OutputError, RunInterrupted
from .files import load_checkpoint, save_state_dict_atomic, write_native, write_text_atomic
from .interfaces import Analysis, Manifold
from .interrupt import deferred, interruptible
from .metrics import compare_costs
from .plan import PruningPlan
from .pruner import progressive_prune
from .replay import calibration_for, replay
from .removal import count_params
from .rundir import STATE_FILE, RunLock, partial_of

log = logging.getLogger("cswap")


def default_run_dir(cfg: RunConfig) -> Path:
    """`<output.dir>/<name>-<time>-<random>`: two runs started in the same second get two
    directories (the lock would refuse the second one otherwise)."""
    return cfg.output.dir / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def describe(cfg: RunConfig) -> str:
    """What `--dry-run` prints: the model, its units, and what would run."""
    a, note = analysis_from_config(cfg, random_if_missing=True, on_device=False)  # every plugin's options validated
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
    target = cfg.pruning.params_ratio or cfg.pruning.flops_ratio
    fast = cfg.pruning.fast
    modes = [name for name in ("group_testing", "sequential", "taylor_order") if getattr(fast, name)]
    lines.append((f"would run  fast modes {', '.join(modes)} on {graph.num_units} units (the plan may differ from the "
                  "exact one)" if modes else f"would run  one forward pass over S per unit ({graph.num_units} units)")
                 + (f", then replay to target {target}" if target else ", then remove non-critical units"))
    from .estimate import estimate

    lines += estimate(a, cfg.seed).lines()  # |S|, engine, trials, a probe pass and the time it implies
    return "\n".join(lines)


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


def prepare(cfg: RunConfig, evaluate: bool = True) -> Setup:
    """Build and check everything before the run directory exists: options (pydantic),
    model and checkpoint, data, units, the classes S covers, the original model's metrics.
    Any bad input fails here and leaves nothing behind."""
    a, note = analysis_from_config(cfg)
    if not a.units.layers:
        raise ModelError("the model has no prunable units: " + "; ".join(f"{n}: {w}" for n, w in a.units.skipped.items()))
    manifold = a.task.manifold(cfg.seed)
    if len(manifold) == 0:
        raise DataError("the sample set S is empty")
    check_coverage(a.task, manifold, a.model, a.example_inputs.to(a.device))
    before = a.task.evaluate(a.model, a.device) if evaluate else {}
    return Setup(a, note, manifold, before)


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
                        write_text_atomic(partial / "report.json", json.dumps(report, indent=1) + "\n")
                if main:
                    rundir.finish(partial, final)
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
        plan = PruningPlan.from_ranking(model, graph, ranking, adapter=a.adapter_name)
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
    """The plan replayed to the configured target (compensated and repaired as configured),
    checked against its cut model, measured beside the original, and saved."""
    a, manifold, device = setup.analysis, setup.manifold, setup.analysis.device
    model, recovery = a.model, cfg.pruning.recovery
    plan = plan.aligned(cfg.pruning.round_to)
    k, latency_search = _steps_for_target(cfg, plan, model, out, a.adapter)
    calibration = calibration_for(a.task, cfg.seed, recovery, manifold)
    replayed = replay(plan, model, k, adapter=a.adapter, graph=a.units, sample_set=manifold, calibration=calibration,
                      recovery=recovery, ridge=cfg.pruning.ridge, progress=progress)
    pruned = replayed.pruned
    diff = self_check(replayed.cut, pruned, manifold.batches[0][0][:64].to(device))
    before, after = dict(setup.before), a.task.evaluate(pruned, device)
    # timed in turns, so the two latencies see the same machine load
    costs = compare_costs([model, pruned], a.example_inputs.to(device), repeats=cfg.output.latency_repeats,
                          batch=cfg.output.latency_batch)
    before.update(costs[0])
    after.update(costs[1])
    save_state_dict_atomic(pruned.state_dict(), out / "pruned_model.pt")
    write_native(pruned, out)  # e.g. an mmseg checkpoint and config beside it
    target = {n: getattr(cfg.pruning, n) for n in ("params_ratio", "flops_ratio", "latency_ratio")}
    report = {
        "model": f"{cfg.model.source}:{cfg.model.name}", "metric": a.task.metric, "adapter": a.adapter_name,
        "target": target, "round_to": cfg.pruning.round_to,
        "intervention": plan.meta.get("intervention", "zero"), "steps_applied": k,
        "categories": plan.category_counts(), "units_total": a.units.num_units, "units_removed": len(plan.units(k)),
        "before": before, "after": after,
        "params_removed_ratio": 1 - after["params"] / before["params"],
        "macs_removed_ratio": 1 - after["macs"] / before["macs"],
        "self_check_max_abs_diff": diff,
    }
    if latency_search is not None:
        report["latency_search"] = latency_search
    if replayed.recovery is not None:  # what the repair did: the metric of the same removal without it
        unrepaired = plan.apply_prefix(model, k, adapter=a.adapter, sample_set=manifold)
        report["recovery"] = {**replayed.recovery.to_json(), a.task.metric + "_before": a.task.evaluate(
            unrepaired, device)[a.task.metric]}
    return report


def _steps_for_target(cfg: RunConfig, plan: PruningPlan, model: nn.Module, out: Path, adapter) -> tuple[int, dict | None]:
    """The prefix for the configured target; a latency target measures its way there with a
    per-layer latency table cached in the run directory (`cswap.latency`)."""
    options = cfg.pruning
    if options.latency_ratio is None:
        return plan.prefix(model, options.params_ratio, options.flops_ratio), None
    from .latency import latency_search, table_for

    table = table_for(plan, model, options.latency_batch, cache=out, adapter=adapter)
    search = latency_search(plan, model, options.latency_ratio, table, adapter=adapter)
    log.info("latency target x%.2f: %d steps, measured x%.2f", options.latency_ratio, search.steps,
             search.measured_speedup)
    return search.steps, search.to_json()


def _save_last_state(out: Path, state: dict) -> None:
    """The decisions made since the last periodic checkpoint, written once more when the
    analysis stops early (a signal, an error); signals wait until the write is done."""
    try:
        with deferred():
            write_text_atomic(out / STATE_FILE, json.dumps(state) + "\n")
    except CSwapError as exc:  # e.g. the disk is full: the previous checkpoint stays
        log.warning("could not save the last decisions: %s", exc)


def load_pruned(run_dir: str | Path) -> nn.Module:
    """Rebuild a run's pruned model in a fresh process: architecture from the config, shape
    from replaying the plan, weights from `pruned_model.pt` (loaded with weights_only).

    A run directory may come from elsewhere, so none of its files can make this run code:
    the config passes the same validation as `cswap prune` (registered plugins only, every
    mmseg `type` checked, never `allow_pickle`), the plan is JSON checked against the model,
    and a malformed file is a `CSwapError` naming it. (An mmseg config *file* that the config
    names is Python and runs, as it did for the run: name only trusted files.)"""
    run_dir = Path(run_dir)
    for name in ("config.yaml", "plan.json", "report.json", "pruned_model.pt"):
        if not (run_dir / name).is_file():
            raise DataError(f"{run_dir} is not a complete run directory: {name} is missing")
    cfg = parse_config(load_config_text((run_dir / "config.yaml").read_text(), run_dir / "config.yaml"))
    plan = _read_plan(run_dir / "plan.json")
    report = _read_json(run_dir / "report.json")
    steps, round_to = report.get("steps_applied"), report.get("round_to")
    if not isinstance(steps, int) or not 0 <= steps <= len(plan.steps):
        raise DataError(f"{run_dir / 'report.json'}: steps_applied {steps!r} is not a step count of the plan "
                        f"(0..{len(plan.steps)})")
    model, _ = build_model(cfg.model.model_copy(update={"weights": None, "allow_pickle": False}))
    if count_params(model) != plan.params_total:
        raise DataError(f"{run_dir / 'plan.json'} was made for a model with {plan.params_total} parameters; "
                        f"the config's model has {count_params(model)}")
    _check_plan_layers(plan, model, run_dir / "plan.json")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise DataError(f"{run_dir / 'report.json'}: round_to {round_to!r} is not a positive width")
    _, adapter = resolve_adapter(cfg.adapter, model)
    pruned = plan.aligned(round_to).remove(model, steps, adapter)  # the shape; the weights (compensated, recovered) come from the file
    load_weights(pruned, load_checkpoint(run_dir / "pruned_model.pt"), str(run_dir / "pruned_model.pt"))
    return pruned.eval()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); was it truncated or edited?") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path} does not hold a JSON object")
    return data


def _read_plan(path: Path) -> PruningPlan:
    try:
        return PruningPlan.from_json(_read_json(path))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path} is not a readable C-SWAP plan: {type(exc).__name__}: {exc}") from exc


def _check_plan_layers(plan: PruningPlan, model: nn.Module, path: Path) -> None:
    """Every layer of the plan is a module of the model, every step a channel of its layer."""
    for name in plan.layers:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise DataError(f"{path}: layer {name!r} of the plan is not a module of {type(model).__name__}") from None
    for step in plan.steps:
        unit = step.unit
        if unit.layer not in plan.layers or not 0 <= unit.channel < int(plan.layers[unit.layer]):
            raise DataError(f"{path}: step {unit} is not a channel of a layer of the plan")
