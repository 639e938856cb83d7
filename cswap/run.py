"""`cswap prune`: one analysis from a config to a run directory.

The run is assembled in `<run>.partial/` and renamed to `<run>/` only after the pruned model
passed its self-check and every file is written, so a directory without the suffix is
always complete, and a failed run leaves only a `.partial` folder with its log.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from .build import build_model, build_scorer, build_task, build_test, resolve_adapter
from .config import RunConfig, dump_config, parse_config
from .errors import ConfigError, CSwapError, DataError, ModelError
from .files import load_checkpoint, save_state_dict_atomic, write_text_atomic
from .metrics import compare_costs
from .plan import PruningPlan
from .pruner import progressive_prune
from .units import Intervention, UnitGraph

log = logging.getLogger("cswap")


def default_run_dir(cfg: RunConfig) -> Path:
    return cfg.output.dir / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def describe(cfg: RunConfig) -> str:
    """What `--dry-run` prints: the model, its units, and what would run."""
    model, note = build_model(cfg.model, random_if_missing=True)
    task = build_task(cfg.task)
    adapter_name, adapter = resolve_adapter(cfg.adapter, model)
    x = task.example_inputs()
    graph = adapter.units(model, x)
    lines = [
        f"model      {cfg.model.source}:{cfg.model.name}  ({sum(p.numel() for p in model.parameters()):,} parameters; {note})",
        f"task       {cfg.task.name}  example input {tuple(x.shape)}",
        f"adapter    {adapter_name}",
        f"scorer     {(cfg.scorer.name if cfg.scorer else task.default_scorer)}",
        f"test       {(cfg.test.name if cfg.test else task.default_test)} {cfg.test.options if cfg.test else ''}",
        f"units      {graph.num_units} in {len(graph.layers)} layers (output to input):",
    ]
    lines += [f"  {layer.name:<40} {layer.channels:>6}" for layer in graph.layers]
    lines += [f"  not pruned: {name}: {why}" for name, why in graph.skipped.items()]
    target = cfg.pruning.params_ratio or cfg.pruning.flops_ratio
    fast = cfg.pruning.fast
    modes = [name for name in ("group_testing", "sequential", "taylor_order") if getattr(fast, name)]
    lines.append((f"would run  fast modes {', '.join(modes)} on {graph.num_units} units (the plan may differ from the "
                  "exact one)" if modes else f"would run  one forward pass over S per unit ({graph.num_units} units)")
                 + (f", then replay to target {target}" if target else ", then remove non-critical units"))
    return "\n".join(lines)


def self_check(model: nn.Module, pruned: nn.Module, graph: UnitGraph, plan: PruningPlan, k: int, batch: torch.Tensor) -> float:
    """Max |pruned - intervened| on a batch of S; the two must agree (removal == cut)."""
    cut_model = copy.deepcopy(model).eval()
    cut = Intervention(cut_model, graph)
    for unit in plan.units(k):
        cut.cut(unit)
    with torch.no_grad():
        a, b = cut_model(batch), pruned.eval()(batch)
    diff = (a - b).abs().max().item()
    scale = max(a.abs().max().item(), 1.0)
    if not diff <= 1e-4 * scale:
        raise ModelError(
            f"self-check failed: the pruned model's outputs differ from the intervened model's by {diff:.3g}; "
            "nothing was saved as complete (please report this with the run's log)"
        )
    return diff


STATE_FILE = "analysis_state.json"


def is_main_process() -> bool:
    """Rank 0 under torch.distributed (or the only process): the one that writes files."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _resume_dirs(resume: str | Path) -> tuple[Path, Path]:
    resume = Path(resume)
    final = resume.with_name(resume.name[: -len(".partial")]) if resume.name.endswith(".partial") else resume
    partial = final.with_name(final.name + ".partial")
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


def run_prune(cfg: RunConfig, run_dir: str | Path | None = None, progress: bool = True,
              resume: str | Path | None = None) -> Path:
    """Run C-SWAP as configured and write the run directory; returns its path.

    `resume` names an interrupted run (`<run>` or `<run>.partial`): its config must equal
    `cfg`, its recorded decisions are replayed and the analysis continues where it stopped.
    """
    main = is_main_process()
    state = None
    if resume is not None:
        final, partial = _resume_dirs(resume)
        _check_same_config(cfg, partial)
        state_path = partial / STATE_FILE
        state = json.loads(state_path.read_text()) if state_path.exists() else {"decisions": []}
    else:
        final = Path(run_dir) if run_dir else default_run_dir(cfg)
        if final.exists() and any(final.iterdir()):
            raise CSwapError(f"run directory {final} already exists and is not empty")
        partial = final.with_name(final.name + ".partial")
        if main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            write_text_atomic(partial / "config.yaml", dump_config(cfg))
    handler = None
    if main:
        handler = logging.FileHandler(partial / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        if state is not None:
            log.info("resuming %s: %d decisions recorded", partial, len(state["decisions"]))
    try:
        report = _run(cfg, partial if main else None, progress and main, state)
        if main:
            write_text_atomic(partial / "report.json", json.dumps(report, indent=1) + "\n")
    except BaseException:
        log.exception("run failed")
        raise
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
    if main:
        (partial / STATE_FILE).unlink(missing_ok=True)
        if final.exists():
            final.rmdir()
        os.replace(partial, final)
    return final


def _run(cfg: RunConfig, out: Path | None, progress: bool, resume: dict | None = None) -> dict:
    """The analysis on every rank; evaluation, replay, self-check and files only where
    `out` is given (rank 0)."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    model, note = build_model(cfg.model)
    log.info("model %s:%s, %s", cfg.model.source, cfg.model.name, note)
    task = build_task(cfg.task)
    scorer, test = build_scorer(cfg.scorer, task), build_test(cfg.test, task)
    adapter_name, adapter = resolve_adapter(cfg.adapter, model)
    x = task.example_inputs()
    graph = adapter.units(model, x)
    if not graph.layers:
        raise ModelError("the model has no prunable units: " + "; ".join(f"{n}: {w}" for n, w in graph.skipped.items()))
    manifold = task.manifold(cfg.seed)
    if len(manifold) == 0:
        raise DataError("the sample set S is empty")
    log.info("%d units in %d layers; |S| = %d", graph.num_units, len(graph.layers), len(manifold))

    model = model.to(device)
    costs = dict(repeats=cfg.output.latency_repeats, batch=cfg.output.latency_batch)
    before = task.evaluate(model, device) if out else {}

    def checkpoint(state: dict) -> None:
        write_text_atomic(out / STATE_FILE, json.dumps(state) + "\n")

    analysis_started = time.perf_counter()
    plan = progressive_prune(
        model, graph, manifold, scorer, test, adapter=adapter_name, seed=cfg.seed,
        shuffle_units=cfg.pruning.shuffle_units, device=device, progress=progress,
        stages=adapter.stages, engine=cfg.pruning.engine, fast=cfg.pruning.fast,
        unit_batch=cfg.pruning.unit_batch,
        checkpoint=checkpoint if out else None, checkpoint_seconds=cfg.output.checkpoint_seconds,
        resume=resume,
    )
    analysis_seconds = time.perf_counter() - analysis_started
    if out is None:
        return {}
    plan.save(out / "plan.json")

    k = plan.prefix(model, cfg.pruning.params_ratio, cfg.pruning.flops_ratio)
    pruned = plan.apply_prefix(model, k, adapter=adapter)
    diff = self_check(model, pruned, graph, plan, k, manifold.batches[0][0][:64].to(device))
    after = task.evaluate(pruned, device)
    # timed in turns, so the two latencies see the same machine load
    cost_before, cost_after = compare_costs([model, pruned], x.to(device), **costs)
    before.update(cost_before)
    after.update(cost_after)
    save_state_dict_atomic(pruned.state_dict(), out / "pruned_model.pt")
    return {
        "model": f"{cfg.model.source}:{cfg.model.name}",
        "metric": task.metric,
        "adapter": adapter_name,
        "target": {"params_ratio": cfg.pruning.params_ratio, "flops_ratio": cfg.pruning.flops_ratio},
        "steps_applied": k,
        "categories": plan.category_counts(),
        "units_total": graph.num_units,
        "units_removed": k,
        "before": before,
        "after": after,
        "params_removed_ratio": 1 - after["params"] / before["params"],
        "macs_removed_ratio": 1 - after["macs"] / before["macs"],
        "self_check_max_abs_diff": diff,
        "analysis_seconds": round(analysis_seconds, 3),
        "total_seconds": round(time.perf_counter() - started, 3),
    }


def load_pruned(run_dir: str | Path) -> nn.Module:
    """Rebuild a run's pruned model in a fresh process: architecture from the config, shape
    from replaying the plan, weights from `pruned_model.pt` (loaded with weights_only)."""
    import yaml

    run_dir = Path(run_dir)
    cfg = parse_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    plan = PruningPlan.load(run_dir / "plan.json")
    report = json.loads((run_dir / "report.json").read_text())
    model, _ = build_model(cfg.model.model_copy(update={"weights": None}))
    _, adapter = resolve_adapter(cfg.adapter, model)
    pruned = plan.apply_prefix(model, report["steps_applied"], adapter=adapter, inplace=True)
    pruned.load_state_dict(load_checkpoint(run_dir / "pruned_model.pt"))
    return pruned.eval()
