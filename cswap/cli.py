"""Command line: `cswap list | prune | demo | curve | sweep | config | export | fixture`
(also `python -m cswap ...`)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import registry
from .errors import CSwapError, RunInterrupted


def _cmd_list(args) -> int:
    """Every plugin, each loaded once so that a broken one is marked with the reason."""
    rows = registry.describe(check=True)
    for kind in registry.GROUPS:
        print(f"{kind} ({registry.GROUPS[kind]}):")
        mine = [r for r in rows if r.kind == kind]
        if not mine:
            print("  (none)")
        for r in mine:
            broken = f"  {r.status}" if r.status != "ok" else ""
            print(f"  {r.name:<22} {r.value:<52} [{r.distribution}]{broken}")
    return 0


def _cmd_prune(args) -> int:
    from .config import load_config
    from .distributed import is_main_process
    from .reports import run_summary
    from .run import describe, run_prune

    cfg = load_config(_config_path(args.config), **_overrides(args))
    if args.dry_run:
        print(describe(cfg))
        return 0
    run_dir = run_prune(cfg, args.out, progress=not args.quiet, resume=args.resume, force=args.force)
    if is_main_process():
        print(run_summary(json.loads((run_dir / "report.json").read_text())))
        print(f"run directory: {run_dir}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import demo_config, ratio_table
    from .reports import run_summary
    from .run import run_prune

    cfg = demo_config(samples_per_class=args.samples_per_class, **_overrides(args))
    print("C-SWAP demo: CIFAR-style ResNet-8 trained on Fashion-MNIST (embedded), "
          f"S = {args.samples_per_class} images per class, alpha = 0.05, per-class voting")
    run_dir = run_prune(cfg, args.out, progress=not args.quiet)
    print(run_summary(json.loads((run_dir / "report.json").read_text())))
    print(ratio_table(run_dir))
    print(f"run directory: {run_dir}  (plan.json, pruned_model.pt, report.json, log.txt)")
    return 0


def _overrides(args) -> dict:
    """`--preset NAME` and the user's `--set`s (which win over the preset), as load_config takes them."""
    return {"overrides": list(getattr(args, "set", [])), "preset": getattr(args, "preset", None)}


def _config_path(text) -> Path:
    from .packaged import config_argument

    return config_argument(text)


def _cmd_config(args) -> int:
    from .packaged import listing, portable_text

    print(portable_text(args.name) if args.name else listing(), end="" if args.name else "\n")
    return 0


def _cmd_export(args) -> int:
    from .export import export_run

    shape = tuple(_split(args.input_shape, int, "--input-shape")) if args.input_shape else None
    path, check = export_run(args.run_dir, args.format, args.out, opset=args.opset, input_shape=shape,
                             dynamic=not args.static)
    print(f"written: {path}" + (f"  ({check})" if check else ""))
    return 0


def _cmd_fixture(args) -> int:
    """A fixture writer registered under `cswap.fixtures` (the core imports no plugin module),
    into a folder that is empty or new unless --force: nothing of the user's is overwritten."""
    from .errors import ConfigError

    writer = registry.load("fixtures", args.kind)
    registry.check_requirements("fixtures", args.kind, writer)
    if args.train_steps is not None and args.train_steps < 0:
        raise ConfigError(f"--train-steps must be 0 or more, got {args.train_steps}")
    _check_fixture_folder(args.out, args.force)
    config = writer(args.out, train_steps=args.train_steps)
    written = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in args.out.iterdir()))
    print(f"written: {args.out}: {written}\ntry: cswap prune {config} --dry-run && cswap prune {config}")
    return 0


def _check_fixture_folder(out: Path, force: bool) -> None:
    from .errors import OutputError

    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file, not a folder: give a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"{out} is not empty: give a new or empty folder, or --force to write the fixture's files "
                          "into it (files of the same names are overwritten, others are left alone)")


def _split(text: str, cast, what: str) -> list:
    from .usertext import parse_list

    return parse_list(text, cast, what)


def _test_grid(items: list[str]) -> dict[str, list]:
    """`--test-option voting=per_class,pooled` (repeatable) -> {"voting": ["per_class", "pooled"]};
    each value is read as YAML, like `--set` (the test's option model validates them)."""
    from .errors import ConfigError
    from .usertext import parse_yaml_value

    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--test-option {item!r} is not of the form NAME=VALUE1,VALUE2")
        grid[key] = [parse_yaml_value(v, f"--test-option {key}") for v in values.split(",")]
    return grid


def _check_seed_count(first: int, count: int) -> None:
    """`--seeds N` runs seeds first .. first+N-1: at least one, all valid seeds."""
    from .config import SEED_MAX
    from .errors import ConfigError

    if count < 1 or first + count - 1 > SEED_MAX:
        raise ConfigError(f"--seeds {count}: give at least 1, with seed + seeds - 1 <= {SEED_MAX} (seed is {first})")


def _cmd_curve(args) -> int:
    from .config import check_device_available, load_config
    from .curves import curve_from_config, parse_criteria, parse_ratios
    from .reports import sauce_markdown
    from .usertext import parse_json_mapping

    cfg = load_config(_config_path(args.config), **_overrides(args))
    check_device_available(cfg.device)
    _check_seed_count(cfg.seed, args.seeds)
    options = (parse_json_mapping(args.criterion_options, "--criterion-options", '\'{"amp": {"tau": 0.02}}\'')
               if args.criterion_options else None)
    specs = parse_criteria(args.criteria, options)
    for spec in specs:  # a missing optional extra (captum, zennit) or a bad option fails now, before any analysis
        registry.create("criteria", spec.name, spec.options)
    out = args.out or cfg.output.dir / f"{cfg.name}-curve"
    result, files = curve_from_config(cfg, specs, args.seeds, parse_ratios(args.ratios), out, progress=not args.quiet,
                                      latency=args.latency, per_class=args.per_class)
    print(sauce_markdown(result, f"SAUCE: {cfg.name}"))
    print("written: " + ", ".join(str(p) for p in files.values()))
    return 0


def _cmd_sweep(args) -> int:
    from .config import load_config
    from .curves import parse_ratios
    from .reports import write_sweep_outputs
    from .sweep import run_sweep, settings

    from .errors import ConfigError

    cfg = load_config(_config_path(args.config), **_overrides(args))
    _check_seed_count(cfg.seed, args.seeds)
    samples = _split(args.samples_per_class, int, "--samples-per-class") if args.samples_per_class else [None]
    if any(m is not None and m < 2 for m in samples):
        raise ConfigError(f"--samples-per-class {args.samples_per_class}: every M_k must be at least 2 (a paired "
                          "test needs two samples of a class)")
    grid = settings(_split(args.alpha, float, "--alpha"), samples, _test_grid(args.test_option))
    out = args.out or cfg.output.dir / f"{cfg.name}-sweep"
    rows = run_sweep(cfg, grid, args.seeds, parse_ratios(args.ratios), progress=not args.quiet)
    files = write_sweep_outputs(rows, out, cfg.name)
    print(files["md"].read_text())
    print("written: " + ", ".join(str(p) for p in files.values()))
    return 0


CONFIG_HELP = ("a YAML run config: a file (relative paths in it are read against its folder), or the name of a "
               "packaged config (`cswap config` lists them), e.g. demo")
PRUNE_EXAMPLES = """examples:
  cswap prune demo --dry-run                       the packaged demo: what would run, |S| and the time it would take
  cswap config demo > my.yaml && cswap prune my.yaml --set pruning.params_ratio=0.3
  cswap prune my.yaml --resume runs/my-20250101-120000-ab12cd   continue an interrupted run
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    try:
        return f"cswap {version('cswap')}"
    except PackageNotFoundError:
        return f"cswap {__version__}"


def _add_file_commands(sub) -> None:
    """`config`, `export`, `fixture`: commands that write files for the user to start from or deploy."""
    s = sub.add_parser("config", help="list the packaged configs, or print one to start from "
                       "(cswap config demo > my.yaml)")
    s.add_argument("name", nargs="?", help="a packaged config; its shipped files are named by absolute paths")
    s.set_defaults(func=_cmd_config)

    s = sub.add_parser("export", help="export a run's pruned model for deployment (ONNX or torch.export)")
    s.add_argument("run_dir", type=Path, help="a complete run directory, or a folder written by cswap.save_pruned "
                   "(with the model's build recipe: save_pruned(..., builder=...))")
    s.add_argument("--format", choices=("onnx", "torch_export"), default="onnx")
    s.add_argument("--out", type=Path, help="output file (default: RUN_DIR/pruned_model.onnx or .pt2)")
    s.add_argument("--opset", type=int, help="ONNX opset version (default: the exporter's)")
    s.add_argument("--input-shape", metavar="C,H,W", help="trace on one input of this shape (default: the analysed "
                   "one); the ONNX file takes any batch, height and width where the model allows it")
    s.add_argument("--static", action="store_true", help="ONNX: fix every axis at the traced shape")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("fixture", help="write a small data folder, a model trained on it and its config "
                       "(cityscapes: DDRNet on Cityscapes-layout frames; detection: RetinaNet on COCO-format scenes)")
    s.add_argument("kind", help="a registered fixture (cswap list: fixtures): cityscapes, detection")
    s.add_argument("out", type=Path, help="a new or empty folder to write (data, weights, config.yaml)")
    s.add_argument("--train-steps", type=int, help="training steps of the model (0: random weights; default: the "
                   "fixture's)")
    s.add_argument("--force", action="store_true", help="write into a folder that is not empty (same-named files "
                   "are overwritten)")
    s.set_defaults(func=_cmd_fixture)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cswap", description="C-SWAP causal one-shot structured pruning")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="list registered plugins and the distributions providing them")
    s.set_defaults(func=_cmd_list)

    s = sub.add_parser("prune", help="run C-SWAP as a YAML config says", epilog=PRUNE_EXAMPLES,
                       description="Run C-SWAP (paper Algorithm 1) as a config says and write a run directory.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("config", help=CONFIG_HELP)
    s.add_argument("--set", action="append", default=[], metavar="A.B=C", help="override a config value")
    s.add_argument("--dry-run", action="store_true", help="validate, build model and units, print what would run")
    s.add_argument("--out", type=Path, help="run directory (default: output.dir/<name>-<time>)")
    s.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run (same config)")
    s.add_argument("--force", action="store_true",
                   help="start afresh even if --out's .partial holds recorded decisions (they are discarded)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--verbose", action="store_true", help="log progress details to stderr")
    s.set_defaults(func=_cmd_prune)

    s = sub.add_parser("demo", help="prune the embedded Fashion-MNIST ResNet (nothing downloaded)")
    s.add_argument("--out", type=Path, help="run directory (default: runs/demo-<time>)")
    s.add_argument("--samples-per-class", type=int, default=32)
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--verbose", action="store_true")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("curve", help="pruning curves and SAUCE of several criteria on the held-out split")
    s.add_argument("config", help=CONFIG_HELP)
    s.add_argument("--criteria", default="cswap,magnitude,random",
                   help="comma-separated registered criteria; NAME/layer adds per-layer normalisation")
    s.add_argument("--criterion-options", metavar="JSON", help='options by criterion, e.g. \'{"amp": {"tau": 0.02}}\'')
    s.add_argument("--seeds", type=int, default=3, help="seeds config.seed, config.seed+1, ...")
    s.add_argument("--ratios", help="parameter ratios (default 0,0.05,...,0.95)")
    s.add_argument("--per-class", action="store_true", help="also measure every class's metric at each point and "
                   "plot one curve per class (curve_per_class.png): a mean curve can hide one class collapsing")
    s.add_argument("--latency", action="store_true", help="also time every replayed model against the original "
                   "(batch 1, in turns, on this device) and plot accuracy vs measured speed-up (curve_latency.png)")
    s.add_argument("--set", action="append", default=[], metavar="A.B=C", help="override a config value")
    s.add_argument("--out", type=Path, help="output folder (default: output.dir/<name>-curve)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_cmd_curve)

    s = sub.add_parser("sweep", help="C-SWAP at several alpha / M_k / test options: categories, accuracy, SAUCE")
    s.add_argument("config", help=CONFIG_HELP)
    s.add_argument("--alpha", default="0.01,0.05,0.1,0.2")
    s.add_argument("--test-option", action="append", default=[], metavar="NAME=V1,V2",
                   help="also vary an option of the configured test, e.g. voting=per_class,pooled (repeatable)")
    s.add_argument("--samples-per-class", help="M_k values, e.g. 16,32 (default: the task's)")
    s.add_argument("--seeds", type=int, default=1)
    s.add_argument("--ratios", help="parameter ratios of the SAUCE curve (default 0,0.05,...,0.95)")
    s.add_argument("--set", action="append", default=[], metavar="A.B=C", help="override a config value")
    s.add_argument("--out", type=Path, help="output folder (default: output.dir/<name>-sweep)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_sweep)
    _add_file_commands(sub)
    from .options import PRESETS

    for name in ("prune", "demo", "curve", "sweep"):
        sub.choices[name].add_argument("--preset", choices=sorted(PRESETS), help="start from a named preset "
                                       "(paper: the published Algorithm 1, zero cut, no recovery); --set wins")
    from .trust import FLAG

    for name in ("prune", "curve", "sweep", "export"):  # never a config field: a received file cannot set it
        sub.choices[name].add_argument(FLAG, action="store_true", help="let mmengine execute an mmseg .py config of "
                                       "your own (reading one runs it; configs shipped inside mmseg and YAML/JSON "
                                       "configs need no flag). Only for files you trust as your own code")
    for sub_parser in sub.choices.values():
        sub_parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


class _CurrentStderr(logging.StreamHandler):
    """A handler on whatever `sys.stderr` is when a record is written: `main()` called in
    one process several times (tests, notebooks) must not write to a stream replaced since."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _console_logging(verbose: bool) -> None:
    """Warnings (or everything with --verbose) on stderr; the run's log file gets INFO."""
    logger = logging.getLogger("cswap")
    if not any(getattr(h, "_cswap_console", False) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        handler._cswap_console = True
        logger.addHandler(handler)
        logger.propagate = False
    for h in logger.handlers:
        if getattr(h, "_cswap_console", False):
            h.setLevel(logging.INFO if verbose else logging.WARNING)


def _init_distributed() -> None:
    """Under torchrun (WORLD_SIZE > 1) join the process group: gloo on CPU, NCCL on GPU."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _console_logging(verbose=getattr(args, "verbose", False))
    _init_distributed()
    from .trust import trust_python_configs

    try:
        with trust_python_configs(getattr(args, "trust_python_config", False)):
            return args.func(args)
    except RunInterrupted as exc:
        if args.debug:
            raise
        hint = (f"; resume with: cswap prune {args.config} --resume {exc.partial}"
                if exc.partial is not None and args.command == "prune" else
                f"; the partial run is in {exc.partial}" if exc.partial is not None else "")
        print(f"interrupted{hint}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except (CSwapError, OSError) as exc:  # bad input, or the machine refused a file: one line, no traceback
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # an optional extra that is not installed: say which
        hint = registry.install_hint(exc)
        if args.debug or not hint:
            raise
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 2
