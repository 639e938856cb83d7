"""Tables and plots of `benchmarks/recovery.py`, rebuilt from its caches every time.

Why separate: the runs take hours and are resumable; the report is rebuilt in seconds from
whatever has finished, so a partial run still gives honest (and labelled) tables.
"""
from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

from cswap.sauce import sauce

AT = (0.3, 0.5, 0.7, 0.8)
ROW_KEYS = ("target", "params_ratio", "steps", "recovery_seconds", "narrowest")


def _load(work: Path) -> dict:
    """model -> {"unpruned": ..., "runs": {(criterion, recovery): [per-seed results]}, "plans": ...}."""
    models = {}
    for folder in sorted(p for p in work.iterdir() if p.is_dir()):
        if not (folder / "unpruned.json").is_file():
            continue
        runs, plans = defaultdict(list), defaultdict(list)
        for path in sorted(folder.glob("*-seed*.plan.json")):
            record = json.loads(path.read_text())
            stem, seed = path.name[: -len(".plan.json")].rsplit("-seed", 1)
            label = record.get("label") or (stem.replace("_", " ", 1) if stem.startswith(("cswap_", "amp_")) else stem)
            plans[label].append({"seed": int(seed), "seconds": record["seconds"],
                                 "categories": record["plan"]["meta"].get("categories", {})})
            for curve in sorted(folder.glob(f"{stem}-seed{seed}-*.json")):
                recovery = curve.name[len(f"{stem}-seed{seed}-"): -len(".json")]
                runs[(label, recovery)].append({"seed": int(seed), **json.loads(curve.read_text())})
        models[folder.name] = {"unpruned": json.loads((folder / "unpruned.json").read_text()), "runs": runs,
                               "plans": plans}
    return models


def _metric(rows: list[dict]) -> str:
    return next(k for k in rows[0] if k not in ROW_KEYS)


def _sauce(result: dict) -> float:
    rows = result["rows"]
    m = _metric(rows)
    return sauce([r["params_ratio"] for r in rows], [100 * r[m] for r in rows])


def _at(result: dict, target: float) -> float | None:
    rows = result["rows"]
    m = _metric(rows)
    hit = [r for r in rows if abs(r["target"] - target) < 1e-9]
    return 100 * hit[0][m] if hit else None


def _narrowest(results: list[dict], target: float = 0.7) -> str:
    """The layer left with the smallest share of its width at `target`, over the seeds
    ("layer after/before"), or "–" when the curves predate that record."""
    hits = [r["narrowest"] for res in results for r in res["rows"]
            if abs(r["target"] - target) < 1e-9 and r.get("narrowest")]
    if not hits:
        return "–"
    name, before, after = min(hits, key=lambda h: (h[2] / h[1], h[0]))
    return f"`{name}` {after}/{before}"


def _mean(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def summarise(models: dict) -> dict:
    """Per model and (criterion, recovery): SAUCE and accuracy at AT, mean over seeds."""
    out = {}
    for model, data in models.items():
        rows = {}
        for (label, recovery), results in data["runs"].items():
            rows[f"{label}|{recovery}"] = {
                "criterion": label, "recovery": recovery, "seeds": len(results),
                "sauce": statistics.mean(_sauce(r) for r in results),
                "sauce_std": statistics.stdev([_sauce(r) for r in results]) if len(results) > 1 else 0.0,
                **{f"at_{int(t * 100)}": _avg([_at(r, t) for r in results]) for t in AT},
                "noncritical": results[0].get("noncritical"),
                "narrowest_70": _narrowest(results),
                "recovery_seconds": statistics.mean(max((x["recovery_seconds"] for x in r["rows"]), default=0.0)
                                                    for r in results),
            }
        seconds = {k: statistics.mean(p["seconds"] for p in v) for k, v in data["plans"].items()}
        out[model] = {"unpruned": data["unpruned"], "rows": rows, "analysis_seconds": seconds}
    return out


def _avg(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _best(summary: dict) -> dict[str, dict]:
    """Per criterion, the recovery with the highest mean SAUCE among those run with the most
    seeds (a one-seed mean is not compared with a three-seed one)."""
    best = {}
    for row in summary["rows"].values():
        key = (row["seeds"], row["sauce"])
        mine = best.get(row["criterion"])
        if mine is None or key > (mine["seeds"], mine["sauce"]):
            best[row["criterion"]] = row
    return best


def _model_markdown(model: str, s: dict) -> list[str]:
    recoveries = sorted({r["recovery"] for r in s["rows"].values()}, key=_recovery_order)
    criteria = list(dict.fromkeys(r["criterion"] for r in s["rows"].values()))
    metric = next(k for k in s["unpruned"] if k not in ("params", "largest_gram"))
    seeds = max(r["seeds"] for r in s["rows"].values())
    lines = [f"## {model}", "", f"Unpruned: {100 * s['unpruned'][metric]:.2f} % {metric}, "
             f"{s['unpruned']['params']:,} parameters; up to {seeds} seed(s) (a cell without ± is one seed).", "",
             "SAUCE (mean ± std over seeds) by criterion and recovery:", "",
             "| criterion | " + " | ".join(recoveries) + " |", "|---|" + "---|" * len(recoveries)]
    for c in criteria:
        cells = []
        for rec in recoveries:
            row = s["rows"].get(f"{c}|{rec}")
            cells.append("n/a" if row is None else (f"{row['sauce']:.1f}" + (f" ± {row['sauce_std']:.1f}"
                                                                              if row["seeds"] > 1 else "")))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "Each criterion with its best recovery: accuracy at 30 / 50 / 70 / 80 % of parameters removed, "
              "the layer left narrowest at 70 % (channels kept / width, the worst seed), the non-critical-only "
              "point (C-SWAP rows), analysis and recovery time:", "",
              "| criterion | best recovery | SAUCE | 30 % | 50 % | 70 % | 80 % | narrowest at 70 % | non-critical only "
              "| analysis (s) | recovery at most (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, row in sorted(_best(s).items(), key=lambda kv: -kv[1]["sauce"]):
        nc = row["noncritical"]
        nc_text = f"{100 * nc['params_ratio']:.1f} % removed: {100 * nc[metric]:.2f} %" if nc else "–"
        cells = [f"{row[f'at_{int(t * 100)}']:.2f}" if row[f"at_{int(t * 100)}"] is not None else "–" for t in AT]
        analysis = s["analysis_seconds"].get(c)
        lines.append(f"| {c} | {row['recovery']} | {row['sauce']:.1f} | " + " | ".join(cells) +
                     f" | {row['narrowest_70']} | {nc_text} | {analysis:.1f} | {row['recovery_seconds']:.2f} |"
                     if analysis is not None else "")
    gram = s["unpruned"].get("largest_gram")
    if gram:
        lines += ["", f"Largest least-squares system: {gram['columns']} columns at `{gram['module']}` "
                  f"(Gram matrix and inverse, float64: {gram['bytes_float64'] / 2**20:.1f} MiB)."]
    return lines + [""]


def _recovery_order(name: str) -> int:
    order = ("none", "bias", "bn", "least_squares", "least_squares+bn")
    return order.index(name) if name in order else len(order)


def _plot(model: str, models: dict, s: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = ["-", "--", "-.", ":"]
    markers = "osD^vP*Xh<>"
    m = "accuracy"
    for i, (c, row) in enumerate(sorted(_best(s).items())):
        result = models[model]["runs"][(c, row["recovery"])][0]
        m = _metric(result["rows"])
        xs, ys = [100 * r["params_ratio"] for r in result["rows"]], [100 * r[m] for r in result["rows"]]
        top = c.startswith("cswap")
        ax.plot(xs, ys, styles[i % 4], marker=markers[i % len(markers)], color=plt.cm.tab10(i % 10),
                label=f"{c} + {row['recovery']}", zorder=3 if top else 2, linewidth=2 if top else 1.2, markersize=4)
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel(f"held-out {m} (%), seed 0")
    ax.set_title(f"{model}: each criterion with its best recovery")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    ax.margins(y=0.05)
    fig.tight_layout()
    path = out / f"{model}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


TITLES = {"recovery": "Recovery after removal: criteria × compensated cut × closed-form repair",
          "tail_order": "The order of the critical tail: keeping layers from emptying (issue #27)"}


def _across_models(summary: dict, recovery: str = "least_squares") -> list[str]:
    """One table per quantity: every criterion (rows) on every model (columns) under
    `recovery`, mean over seeds (a cell's seed count in brackets when it is not 3)."""
    models = [m for m, s in summary.items() if s["rows"]]
    labels = list(dict.fromkeys(r["criterion"] for m in models for r in summary[m]["rows"].values()
                                if r["recovery"] == recovery))
    lines = [f"## Across models ({recovery} recovery)", ""]
    for key, title in (("sauce", "SAUCE"), ("at_70", "accuracy (or mIoU) at 70 % removed"),
                       ("at_80", "at 80 % removed")):
        lines += [f"{title}, mean over seeds:", "", "| criterion | " + " | ".join(models) + " |",
                  "|---|" + "---|" * len(models)]
        for label in labels:
            cells = []
            for m in models:
                row = summary[m]["rows"].get(f"{label}|{recovery}")
                value = None if row is None else row[key]
                seeds = "" if value is None or row["seeds"] == 3 else f" [{row['seeds']}]"
                cells.append("" if value is None else f"{value:.1f}{seeds}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def write_report(work: Path, out: Path, name: str = "recovery") -> str:
    """`out/<name>.md` (with `benchmarks/<name>_notes.md`, the hand-written reading, appended),
    `.json`, `.csv` and `out/<name>/<model>.png`, from the caches under `work`."""
    models = _load(work)
    summary = summarise(models)
    lines = [f"# {TITLES.get(name, name)}", "",
             f"Made by `python benchmarks/recovery.py --work {work} --report {name}` (resumable; add `--report-only` "
             "to rebuild this page). Accuracy on each model's held-out split; calibration is the seed's S from the "
             "sample split. SAUCE over the ratios 0, 0.1, …, 0.9 of parameters removed (and the plan's last "
             "reachable point). One process, one torch thread, on a shared 2-core machine (not idle): compare "
             "times within a table.", ""]
    if name != "recovery":
        lines += _across_models(summary)
    for model, s in summary.items():
        if not s["rows"]:
            continue  # started, nothing replayed yet
        lines += _model_markdown(model, s)
        lines += [f"![{model}]({name}/{_plot(model, models, s, out / name).name})", ""]
    notes = Path(__file__).with_name(f"{name}_notes.md")  # the hand-written reading, kept across reruns
    if notes.is_file():
        lines += [notes.read_text()]
    text = "\n".join(lines)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "criterion", "recovery", "seeds", "sauce", "sauce_std"] +
                        [f"at_{int(t * 100)}" for t in AT] + ["narrowest_70"])
        for model, s in summary.items():
            for row in s["rows"].values():
                writer.writerow([model, row["criterion"], row["recovery"], row["seeds"], round(row["sauce"], 3),
                                 round(row["sauce_std"], 3)] + [row[f"at_{int(t * 100)}"] for t in AT] +
                                [row["narrowest_70"]])
    return text
