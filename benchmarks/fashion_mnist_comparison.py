"""The paper's comparison on real data: Fashion-MNIST, a ResNet-20 and a small MobileNetV2.

One command runs everything (issue 3, items 5 and 6) and writes `docs/results/`:

    python benchmarks/fashion_mnist_comparison.py            # full run, both architectures
    python benchmarks/fashion_mnist_comparison.py --smoke    # tiny settings, to /tmp, minutes

Parts, per architecture (resumable: each criterion or setting is cached under --work and
skipped when cached, unless --force; the part's tables are rebuilt from the caches every time):
  train        the checkpoint, if absent (seeded; the command is in the configs and sidecars)
  table3       `cswap.curves.run_curves` for every criterion and seed: SAUCE mean +- std (Table 3)
  fig6         `cswap.sweep.run_sweep` over alpha x voting (Fig. 6)
  samples      `cswap.sweep.run_sweep` over M_k (sample-size sensitivity)
  definition1  `run_sweep` with the significance test's effect x verdict (issue item 6)
then `report` writes the combined tables (Table 4, the category counts, comes from table3's
C-SWAP analyses) and `docs/results/fashion_mnist/summary.md`.

With --workers 4 (default) each architecture runs as two processes (table3; the sweeps), one
torch thread each, after the checkpoints exist; --workers 2: one process per architecture;
--workers 1: serial. The report is made once all are done. Intermediate plans and per-setting caches live under
--work (default runs/fashion_mnist_benchmark/, not committed); tables, PNGs and JSON go to --out.

Data: the full Fashion-MNIST, read locally (`apt-get install dataset-fashion-mnist`, or
CSWAP_FASHION_MNIST=DIR; see benchmarks/datasets.py); without it the script stops at once
with that hint.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.chdir(REPO_ROOT)  # configs name checkpoints relative to the repository root

import numpy as np
import torch

from benchmarks.datasets import fashion_mnist_root

ARCHS = {
    "resnet20": {"config": "configs/fashion_mnist_resnet20_w8.yaml", "title": "ResNet-20 (width 8)",
                 "train": ["--arch", "cifar_resnet20", "--width", "8", "--epochs", "4", "--train-limit", "15000",
                           "--threads", "1", "--seed", "0", "--out", "benchmarks/checkpoints/fmnist_resnet20_w8.pt"]},
    "mobilenetv2": {"config": "configs/fashion_mnist_mobilenetv2.yaml", "title": "MobileNetV2 (small)",
                    "train": ["--arch", "fmnist_mobilenetv2", "--width", "16", "--epochs", "4", "--train-limit",
                              "15000", "--lr", "0.05", "--threads", "1", "--seed", "0",
                              "--out", "benchmarks/checkpoints/fmnist_mobilenetv2.pt"]},
}
ALL_CRITERIA = ("random,magnitude,magnitude/layer,cbp,amp,cswap,integrated_gradients,integrated_gradients/layer,"
                "deeplift,conductance,internal_influence,lrp,lrp/layer")
PARTS = ("train", "table3", "fig6", "samples", "definition1")
EFFECTS = ("relative", "absolute", "log_ratio")
VERDICTS = ("global_sign", "per_class_sign")

FULL = dict(seeds=3, samples_per_class=16, eval_limit=1000, ratios="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
            alphas="0.01,0.05,0.1,0.2", votings="per_class,pooled", sweep_seeds=1, mk="16,32,64,128",
            def1_seeds=3, criteria=ALL_CRITERIA, criterion_options="{}")
SMOKE = dict(seeds=2, samples_per_class=4, eval_limit=200, ratios="0,0.5", alphas="0.05,0.2",
             votings="per_class,pooled", sweep_seeds=1, mk="4,8", def1_seeds=1, criteria=ALL_CRITERIA,
             criterion_options=json.dumps({n: {"n_steps": 4} for n in
                                           ("integrated_gradients", "conductance", "internal_influence")}))


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def mean_sd(values) -> tuple[float, float]:
    v = np.asarray(list(values), dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


# ---- configuration -----------------------------------------------------------------------

def arch_config(arch: str, args, **task_options):
    """The arch's YAML config with the benchmark's task options (M_k, eval_limit) applied."""
    from cswap.config import load_config

    cfg = load_config(ARCHS[arch]["config"], [f"task.options.root={fashion_mnist_root()}"])
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": checkpoint(arch, args)})})
    options = {**cfg.task.options, "samples_per_class": args.samples_per_class, "eval_limit": args.eval_limit,
               **task_options}
    return cfg.model_copy(update={"task": cfg.task.model_copy(update={"options": options})})


def with_test_options(cfg, **options):
    test = cfg.test.model_copy(update={"options": {**cfg.test.options, **options}})
    return cfg.model_copy(update={"test": test})


class Timings:
    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def record(self, key: str, seconds: float) -> None:
        self.data[key] = round(seconds, 1)
        write_json(self.path, self.data)


# ---- parts -------------------------------------------------------------------------------

def train_argv(arch: str, args) -> list[str]:
    """The recorded training command; --smoke trains 1 epoch on 512 images into the work folder."""
    argv = list(ARCHS[arch]["train"])
    if args.smoke:
        for flag, value in (("--epochs", "1"), ("--train-limit", "512"), ("--out", str(args.work / f"{arch}.pt"))):
            argv[argv.index(flag) + 1] = value
    return argv


def checkpoint(arch: str, args) -> Path:
    argv = train_argv(arch, args)
    return Path(argv[argv.index("--out") + 1])


def part_train(arch: str, args, out: Path, work: Path, timings: Timings) -> None:
    from benchmarks import train_fashion_mnist

    argv = train_argv(arch, args)
    ckpt = checkpoint(arch, args)
    if ckpt.exists() and not args.force_train:
        say(f"{arch}: checkpoint {ckpt} exists, not retraining")
        return
    say(f"{arch}: training {' '.join(argv)}")
    started = time.perf_counter()
    train_fashion_mnist.main(argv)
    timings.record("train", time.perf_counter() - started)


def part_table3(arch: str, args, out: Path, work: Path, timings: Timings) -> None:
    """Every criterion x seed with run_curves; one cached result file per criterion."""
    from cswap.curves import parse_criteria, parse_ratios, run_curves, setup_from_config
    from cswap.reports import CurveResult, write_curve_outputs

    dest = out / "table3"
    cfg = arch_config(arch, args)
    specs = parse_criteria(args.criteria, json.loads(args.criterion_options))
    seeds = [cfg.seed + i for i in range(args.seeds)]
    ratios = parse_ratios(args.ratios)
    torch.manual_seed(cfg.seed)
    s = setup_from_config(cfg)
    parts = []
    for spec in specs:
        cache = work / "table3" / f"{spec.label.replace('/', '-')}.json"
        if cache.exists() and not args.force:
            say(f"{arch}: table3 {spec.label}: cached")
        else:
            say(f"{arch}: table3 {spec.label}, seeds {seeds} ...")
            started = time.perf_counter()
            r = run_curves(s.model, s.graph, s.task, [spec], seeds, ratios, adapter_name=s.adapter_name,
                           adapter=s.adapter, context=s.context, plans_dir=work / "table3" / "plans", progress=False)
            seconds = time.perf_counter() - started
            write_json(cache, {**asdict(r), "wall_seconds": seconds})
            timings.record(f"table3/{spec.label}", seconds)
            say(f"{arch}: table3 {spec.label}: SAUCE {[round(a['sauce'], 1) for a in r.analyses]} "
                f"({seconds:.0f} s)")
        parts.append(json.loads(cache.read_text()))
    result = CurveResult(parts[0]["metric"], parts[0]["unpruned"], parts[0]["params_total"],
                         [row for p in parts for row in p["rows"]], [a for p in parts for a in p["analyses"]])
    meta = {"config": cfg.name, "model": f"{cfg.model.source}:{cfg.model.name}", "seeds": seeds,
            "ratios": list(ratios), "criteria": [asdict(c) for c in specs],
            "samples_per_class": args.samples_per_class, "eval_limit": args.eval_limit}
    write_curve_outputs(result, dest, f"{ARCHS[arch]['title']} on Fashion-MNIST, M_k={args.samples_per_class}", meta)
    timings.record("table3", sum(p["wall_seconds"] for p in parts))


def run_settings(arch: str, args, jobs: list[tuple[str, object, object, int]], cache_dir: Path,
                 timings: Timings, part: str) -> list[dict]:
    """jobs: (key, config, cswap.sweep.Setting, seeds). One run_sweep per job, cached by key."""
    from cswap.curves import parse_ratios
    from cswap.sweep import run_sweep

    rows = []
    for key, cfg, setting, seeds in jobs:
        cache = cache_dir / f"{key}.json"
        if cache.exists() and not args.force:
            say(f"{arch}: {part} {key}: cached")
        else:
            say(f"{arch}: {part} {key} ({seeds} seed(s)) ...")
            started = time.perf_counter()
            got = run_sweep(cfg, [setting], seeds, parse_ratios(args.ratios), progress=False)
            seconds = time.perf_counter() - started
            write_json(cache, {"rows": got, "wall_seconds": seconds})
            timings.record(f"{part}/{key}", seconds)
            say(f"{arch}: {part} {key}: SAUCE {[round(r['sauce'], 1) for r in got]}, non-critical "
                f"{[r['noncritical_units'] for r in got]} units ({seconds:.0f} s)")
        data = json.loads(cache.read_text())
        rows += [{"key": key, **r} for r in data["rows"]]
    timings.record(part, sum(json.loads((cache_dir / f"{k}.json").read_text())["wall_seconds"] for k, *_ in jobs))
    return rows


def _strip_key(rows):
    return [{k: v for k, v in r.items() if k != "key"} for r in rows]


def part_fig6(arch: str, args, out: Path, work: Path, timings: Timings) -> None:
    from cswap.sweep import settings

    grid = settings([float(a) for a in args.alphas.split(",")], args.votings.split(","), [args.samples_per_class])
    sweep_part(arch, args, out, work, timings, "fig6", grid,
               lambda g: f"alpha{g.alpha:g}-{g.voting}-M{g.samples_per_class}", "alpha x voting")


def part_samples(arch: str, args, out: Path, work: Path, timings: Timings) -> None:
    from cswap.sweep import settings

    grid = settings([0.05], ["per_class"], [int(m) for m in args.mk.split(",")])
    sweep_part(arch, args, out, work, timings, "samples", grid, lambda g: f"M{g.samples_per_class}", "M_k")


def sweep_part(arch: str, args, out: Path, work: Path, timings: Timings, part: str, grid, key, title: str) -> None:
    """One cached run_sweep per setting of `grid` (named by `key(setting)`), then the part's tables."""
    from cswap.reports import write_sweep_outputs

    cfg = arch_config(arch, args)
    jobs = [(key(g), cfg, g, args.sweep_seeds) for g in grid]
    rows = run_settings(arch, args, jobs, work / part, timings, part)
    write_sweep_outputs(_strip_key(rows), out / part, f"{ARCHS[arch]['title']}: {title}")


def part_definition1(arch: str, args, out: Path, work: Path, timings: Timings) -> None:
    from cswap.sweep import Setting

    dest = out / "definition1"
    base = arch_config(arch, args)
    setting = Setting(0.05, "per_class", args.samples_per_class)
    jobs = [(f"{e}-{v}", with_test_options(base, effect=e, verdict=v), setting, args.def1_seeds)
            for e in EFFECTS for v in VERDICTS]
    rows = run_settings(arch, args, jobs, work / "definition1", timings, "definition1")
    for r in rows:
        r["effect"], r["verdict"] = r["key"].split("-")
    summary = []
    for e in EFFECTS:
        for v in VERDICTS:
            mine = [r for r in rows if (r["effect"], r["verdict"]) == (e, v)]
            entry = {"effect": e, "verdict": v, "seeds": len(mine)}
            for k in ("sauce", "noncritical_accuracy", "noncritical_params_ratio", "noncritical_units",
                      "neutral", "detrimental", "critical"):
                entry[k], entry[k + "_std"] = mean_sd(r[k] for r in mine)
            entry["unpruned_accuracy"] = mine[0]["unpruned_accuracy"]
            summary.append(entry)
    dest.mkdir(parents=True, exist_ok=True)
    write_json(dest / "definition1.json", {"rows": rows, "summary": summary})
    (dest / "definition1.md").write_text(definition1_markdown({arch: summary}))
    plot_definition1(summary, dest / "definition1.png", ARCHS[arch]["title"])


def definition1_markdown(by_arch: dict[str, list[dict]]) -> str:
    lines = ["| architecture | effect | verdict | seeds | SAUCE | non-critical only: accuracy | "
             "params removed | neutral | detrimental | critical |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arch, summary in by_arch.items():
        for s in summary:
            paper = " (paper)" if (s["effect"], s["verdict"]) == ("relative", "global_sign") else ""
            lines.append(
                f"| {ARCHS[arch]['title']} | {s['effect']}{paper} | {s['verdict']} | {s['seeds']} | "
                f"{s['sauce']:.1f} ± {s['sauce_std']:.1f} | {100 * s['noncritical_accuracy']:.2f} ± "
                f"{100 * s['noncritical_accuracy_std']:.2f} % (unpruned {100 * s['unpruned_accuracy']:.2f}) | "
                f"{100 * s['noncritical_params_ratio']:.1f} % | {s['neutral']:.1f} | {s['detrimental']:.1f} | "
                f"{s['critical']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_definition1(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = [f"{s['effect']}\n{s['verdict']}" for s in summary]
    x = np.arange(len(summary))
    axes[0].bar(x, [s["sauce"] for s in summary], yerr=[s["sauce_std"] for s in summary], capsize=3)
    axes[0].set_ylabel("SAUCE")
    axes[1].bar(x - 0.2, [100 * s["noncritical_accuracy"] for s in summary], 0.4,
                yerr=[100 * s["noncritical_accuracy_std"] for s in summary], capsize=3, label="accuracy (%)")
    axes[1].bar(x + 0.2, [100 * s["noncritical_params_ratio"] for s in summary], 0.4,
                yerr=[100 * s["noncritical_params_ratio_std"] for s in summary], capsize=3,
                label="params removed (%)")
    axes[1].axhline(100 * summary[0]["unpruned_accuracy"], color="k", ls="--", lw=1, label="unpruned accuracy")
    axes[1].set_title("non-critical units only")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(x, labels, fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Definition 1 variants: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- report ------------------------------------------------------------------------------

def report(archs: list[str], out: Path) -> Path:
    """Combined Table 3 / Table 4 / Definition-1 tables and summary.md, from the parts' files."""
    sections = ["# Fashion-MNIST comparison: generated tables", "",
                "Generated by `benchmarks/fashion_mnist_comparison.py` from the per-architecture results "
                "in this folder; see `../fashion_mnist.md` for what was run and what it shows.", ""]
    loaded = {a: json.loads((out / a / "table3" / "curve.json").read_text())
              for a in archs if (out / a / "table3" / "curve.json").exists()}
    if loaded:
        labels = list(dict.fromkeys(r["criterion"] for d in loaded.values() for r in d["sauce"]))
        head = "| criterion | " + " | ".join(ARCHS[a]["title"] for a in loaded) + " |"
        t3 = ["## Table 3 analog: SAUCE (mean ± std over seeds)", "",
              "Unpruned accuracy: " + ", ".join(f"{ARCHS[a]['title']} {100 * d['unpruned']:.2f} %"
                                                 for a, d in loaded.items()) +
              f" (on {next(iter(loaded.values()))['eval_limit']} test images). M_k = "
              f"{next(iter(loaded.values()))['samples_per_class']}, ratios "
              f"{next(iter(loaded.values()))['ratios']} (+ the plan's last reachable ratio).", "",
              head, "|---|" + "---|" * len(loaded)]
        for label in labels:
            cells = []
            for a, d in loaded.items():
                row = next((r for r in d["sauce"] if r["criterion"] == label), None)
                best = max(r["sauce_mean"] for r in d["sauce"])
                if row is None:
                    cells.append("")
                else:
                    text = f"{row['sauce_mean']:.1f} ± {row['sauce_std']:.1f}"
                    cells.append(f"**{text}**" if row["sauce_mean"] == best else text)
            t3.append(f"| {label} | " + " | ".join(cells) + " |")
        t3 += ["", "Analysis time per seed (s, mean): " + "; ".join(
            f"{ARCHS[a]['title']}: " + ", ".join(f"{r['criterion']} {r['analysis_seconds']:.0f}" for r in d["sauce"])
            for a, d in loaded.items()), ""]
        (out / "table3.md").write_text("\n".join(t3) + "\n")
        sections += t3
        t4 = ["## Table 4 analog: C-SWAP categories (mean ± std over seeds, alpha 0.05, per-class voting)", "",
              "| architecture | units | neutral | detrimental | critical | untested (last unit of a layer) |",
              "|---|---|---|---|---|---|"]
        for a, d in loaded.items():
            runs = [r for r in d["analyses"] if r["criterion"] == "cswap"]
            if not runs:
                continue
            cells = [mean_sd(r["categories"].get(k, 0) for r in runs) for k in
                     ("neutral", "detrimental", "critical", "untested")]
            units = sum(runs[0]["categories"].values())
            t4.append(f"| {ARCHS[a]['title']} | {units} | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in cells) + " |")
        cbp = [(a, [r for r in d["analyses"] if r["criterion"] == "cbp"]) for a, d in loaded.items()]
        if any(runs for _, runs in cbp):
            t4 += ["", "C-BP (every unit tested once on the unpruned model, same test):", "",
                   "| architecture | neutral | detrimental | critical |", "|---|---|---|---|"]
            for a, runs in cbp:
                if runs:
                    t4.append(f"| {ARCHS[a]['title']} | " + " | ".join(
                        "{:.1f} ± {:.1f}".format(*mean_sd(r["categories"].get(k, 0) for r in runs))
                        for k in ("neutral", "detrimental", "critical")) + " |")
        (out / "table4.md").write_text("\n".join(t4) + "\n")
        sections += t4 + [""]
    for part, title in (("fig6", "Fig. 6 analog: alpha x voting"), ("samples", "Sample size M_k")):
        for a in archs:
            md = out / a / part / "sweep.md"
            if md.exists():
                body = md.read_text().split("\n", 2)[2]  # drop its title
                sections += [f"## {title}: {ARCHS[a]['title']}", "", body.strip(), "",
                             f"![]({a}/{part}/sweep.png)", ""]
    d1 = {a: json.loads((out / a / "definition1" / "definition1.json").read_text())["summary"]
          for a in archs if (out / a / "definition1" / "definition1.json").exists()}
    if d1:
        text = definition1_markdown(d1)
        (out / "definition1.md").write_text("# Definition 1 variants (alpha 0.05, per-class tests)\n\n" + text)
        sections += ["## Definition 1 variants: effect x verdict (alpha 0.05, per-class tests)", "", text.strip(), ""]
        sections += [f"![]({a}/definition1/definition1.png)" for a in d1] + [""]
    timing_lines = ["## Wall-clock time per part (s; shared 2-core machine, one torch thread per process)", "",
                    "| architecture | part | seconds |", "|---|---|---|"]
    for a in archs:
        for part in PARTS:
            tpath = out / a / "timings" / f"{part}.json"
            if not tpath.exists():
                continue
            for k, v in json.loads(tpath.read_text()).items():
                timing_lines.append(f"| {ARCHS[a]['title']} | {k} | {v:.0f} |")
    sections += timing_lines + [""]
    path = out / "summary.md"
    path.write_text("\n".join(sections))
    return path


# ---- driver ------------------------------------------------------------------------------

def run_arch(arch: str, args, out: Path, work: Path, parts: list[str]) -> None:
    out, work = out / arch, work / arch
    out.mkdir(parents=True, exist_ok=True)
    fns = {"train": part_train, "table3": part_table3, "fig6": part_fig6, "samples": part_samples,
           "definition1": part_definition1}
    for part in parts:
        started = time.perf_counter()
        say(f"{arch}: part {part}")
        fns[part](arch, args, out, work, Timings(out / "timings" / f"{part}.json"))
        say(f"{arch}: part {part} finished in {time.perf_counter() - started:.0f} s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet20,mobilenetv2", help=f"comma-separated, of {sorted(ARCHS)}")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {PARTS} (report always runs)")
    p.add_argument("--smoke", action="store_true", help="tiny settings, output to /tmp/cswap_fmnist_smoke")
    p.add_argument("--out", type=Path, help="results folder (default docs/results/fashion_mnist)")
    p.add_argument("--work", type=Path, help="plans and caches (default runs/fashion_mnist_benchmark)")
    p.add_argument("--force", action="store_true", help="recompute cells that are cached under --work")
    p.add_argument("--force-train", action="store_true", help="retrain even if the checkpoint exists")
    p.add_argument("--workers", type=int, default=4,
                   help="parallel processes: 2 = one per architecture, 4 = also table3 apart from the sweeps; 1 = serial")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # set for worker processes
    for k, v in FULL.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None, help=f"default {v!r}")
    args = p.parse_args(argv)
    defaults = SMOKE if args.smoke else FULL
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.out = args.out or (Path("/tmp/cswap_fmnist_smoke/results") if args.smoke else Path("docs/results/fashion_mnist"))
    args.work = args.work or (Path("/tmp/cswap_fmnist_smoke/work") if args.smoke else Path("runs/fashion_mnist_benchmark"))
    args.archs = [a for a in args.arch.split(",") if a]
    args.parts = [x for x in args.parts.split(",") if x]
    bad = [a for a in args.archs if a not in ARCHS] + [x for x in args.parts if x not in PARTS]
    if bad:
        p.error(f"unknown architecture or part: {bad}")
    return args


def split_parts(parts: list[str], workers: int) -> list[list[str]]:
    """Parts of one architecture over `workers // 2` processes (at least 1): table3 alone, the rest together."""
    parts = [x for x in parts if x != "train"]
    if workers < 4 or "table3" not in parts or len(parts) == 1:
        return [parts] if parts else []
    return [["table3"], [x for x in parts if x != "table3"]]


def strip_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv without the given flags and their values (both `--flag value` and `--flag=value`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif not any(a.startswith(f + "=") for f in flags):
            out.append(a)
    return out


def main(argv=None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    fashion_mnist_root()  # stop now, with the setup hint, on a machine without the data
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    say(f"archs {args.archs}, parts {args.parts}, out {args.out}, work {args.work}, "
        f"M_k {args.samples_per_class}, seeds {args.seeds}, eval_limit {args.eval_limit}")
    if args.workers > 1:
        if "train" in args.parts:  # checkpoints first: every worker of an architecture needs it
            for arch in args.archs:
                run_arch(arch, args, args.out, args.work, ["train"])
        groups = [(arch, group) for arch in args.archs for group in split_parts(args.parts, args.workers)]
        procs = []
        for arch, group in groups:
            cmd = [sys.executable, "-u", str(Path(__file__).resolve()), *strip_flags(raw_argv, ("--arch", "--parts", "--workers")),
                   "--arch", arch, "--parts", ",".join(group), "--workers", "1", "--no-report"]
            say(f"starting worker: {' '.join(cmd)}")
            procs.append(subprocess.Popen(cmd))
        codes = [p.wait() for p in procs]
        if any(codes):
            say(f"a worker failed: exit codes {codes}")
            return 1
    else:
        for arch in args.archs:
            run_arch(arch, args, args.out, args.work, args.parts)
    if not args.no_report:
        path = report(args.archs, args.out)
        say(f"report: {path}")
    say(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
