"""Command line: `cswap list | prune | demo` (also `python -m cswap ...`)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import registry
from .errors import CSwapError


def _cmd_list(args) -> int:
    rows = registry.describe()
    for kind in registry.GROUPS:
        print(f"{kind} ({registry.GROUPS[kind]}):")
        mine = [r for r in rows if r.kind == kind]
        if not mine:
            print("  (none)")
        for r in mine:
            print(f"  {r.name:<22} {r.value:<52} [{r.distribution}]")
    return 0


def _cmd_prune(args) -> int:
    from .config import load_config
    from .demo import summary
    from .run import describe, run_prune

    cfg = load_config(args.config, args.set)
    if args.dry_run:
        print(describe(cfg))
        return 0
    run_dir = run_prune(cfg, args.out, progress=not args.quiet)
    print(summary(json.loads((run_dir / "report.json").read_text())))
    print(f"run directory: {run_dir}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import demo_config, summary
    from .run import run_prune

    cfg = demo_config(samples_per_class=args.samples_per_class)
    print("C-SWAP demo: CIFAR-style ResNet-8 trained on Fashion-MNIST (embedded), "
          f"S = {args.samples_per_class} images per class, alpha = 0.05, per-class voting")
    run_dir = run_prune(cfg, args.out, progress=not args.quiet)
    print(summary(json.loads((run_dir / "report.json").read_text())))
    print(f"run directory: {run_dir}  (plan.json, pruned_model.pt, report.json, log.txt)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cswap", description="C-SWAP causal one-shot structured pruning")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="list registered plugins and the distributions providing them")
    s.set_defaults(func=_cmd_list)

    s = sub.add_parser("prune", help="run C-SWAP as a YAML config says")
    s.add_argument("config", type=Path)
    s.add_argument("--set", action="append", default=[], metavar="A.B=C", help="override a config value")
    s.add_argument("--dry-run", action="store_true", help="validate, build model and units, print what would run")
    s.add_argument("--out", type=Path, help="run directory (default: output.dir/<name>-<time>)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_cmd_prune)

    s = sub.add_parser("demo", help="prune the embedded Fashion-MNIST ResNet (nothing downloaded)")
    s.add_argument("--out", type=Path, help="run directory (default: runs/demo-<time>)")
    s.add_argument("--samples-per-class", type=int, default=32)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except CSwapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
