"""Everything the commands write for a person to read: tables, CSV, JSON and plots.

`cswap prune` and the demo print `run_summary`; `cswap curve` writes `write_curve_outputs`
(curve.csv, curve.json, sauce.md, curve.png); `cswap sweep` writes `write_sweep_outputs`
(sweep.csv, sweep.json, sweep.md, sweep.png). Files are written atomically.
"""
from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .files import json_text, write_text_atomic


def run_summary(report: dict) -> str:
    """The before/after table `cswap prune` and the demo print (README quotes it)."""
    b, a = report["before"], report["after"]
    metric = report.get("metric", "accuracy")
    batch_key = next(k for k in b if k.startswith("latency_ms_batch") and k != "latency_ms_batch1")
    rows = [
        ("parameters", f"{b['params']:,}", f"{a['params']:,}", f"-{report['params_removed_ratio']:.1%}"),
        ("MACs / image", f"{b['macs']:,}", f"{a['macs']:,}", f"-{report['macs_removed_ratio']:.1%}"),
        ("latency, batch 1 (ms)", f"{b['latency_ms_batch1']:.2f}", f"{a['latency_ms_batch1']:.2f}",
         f"x{b['latency_ms_batch1'] / a['latency_ms_batch1']:.2f}"),
        (f"latency, {batch_key[11:].replace('batch', 'batch ')} (ms)", f"{b[batch_key]:.2f}", f"{a[batch_key]:.2f}",
         f"x{b[batch_key] / a[batch_key]:.2f}"),
        (f"{metric} (held-out{', ' + str(b['eval_samples']) + ' samples' if 'eval_samples' in b else ''})",
         f"{b[metric]:.2%}", f"{a[metric]:.2%}", f"{(a[metric] - b[metric]) * 100:+.2f} pt"),
    ]
    recovery = report.get("recovery")
    if recovery:  # what the closed-form repair did: the same removal without it
        unrepaired = recovery[metric + "_before"]
        rows.insert(-1, (f"{metric}, before recovery ({recovery['methods']})", f"{b[metric]:.2%}",
                         f"{unrepaired:.2%}", f"{(unrepaired - b[metric]) * 100:+.2f} pt"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'original':>12}  {'pruned':>12}  {'change':>9}"]
    lines += [f"{r[0]:<{width}}  {r[1]:>12}  {r[2]:>12}  {r[3]:>9}" for r in rows]
    c = report["categories"]
    lines.append(
        f"units: {report['units_total']} analysed -> {c.get('neutral', 0)} neutral, "
        f"{c.get('detrimental', 0)} detrimental, {c.get('critical', 0)} critical, "
        + (f"{c['inconclusive']} inconclusive, " if c.get("inconclusive") else "")
        + f"{c.get('untested', 0)} kept as last of their layer; {report['units_removed']} removed"
    )
    repair = f", recovery {recovery['seconds']:.1f} s" if recovery else ""
    lines.append(f"analysis {report['analysis_seconds']:.1f} s{repair}, total {report['total_seconds']:.1f} s")
    lines += report.get("judgement", {}).get("lines", [])  # the test's power, what it could not judge (power.py)
    lines += report.get("collapse", {}).get("lines", [])  # a bottleneck below its floor, near chance (collapse.py)
    lines += held_out_fit_lines(recovery)
    lines += latency_notes(b, a)
    if report.get("quality"):
        lines += quality_summary(report["quality"], metric, report["steps_applied"])
    elif (report.get("per_class") or {}).get("worst_class"):  # every run: the class the mean hides
        w = report["per_class"]["worst_class"]
        lines.append(f"worst class on the test split: {w['name']} ({w['class']}), {metric} {w['before']:.2%} -> "
                     f"{w['after']:.2%}, drop {w['drop']:+.2f} pt (every class: class_metrics.png)")
    return "\n".join(lines)


def held_out_fit_lines(recovery: dict | None) -> list[str]:
    """The least-squares re-fits whose system was too small for its columns (cswap/heldout.py):
    their held-out fit beside their calibration fit, and how many layers were left unrepaired."""
    h = (recovery or {}).get("held_out")
    if not h:
        return []
    return [f"recovery: {h['refits']} least-squares re-fit(s) had too few calibration rows for their columns: R^2 "
            f"{h['calibration_r2']:.3g} on the calibration samples, {h['held_out_r2']:.3g} on held-out ones "
            f"(unrepaired {h['unrepaired_held_out_r2']:.3g}); {h['left_unrepaired']} left unrepaired "
            "(no held-out gain)"]


def latency_notes(before: dict, after: dict) -> list[str]:
    """Where the latency was measured, and warnings a person must not miss: the pruned model
    slower than the original in that runtime, or timings too noisy to trust (`cswap.backends`)."""
    timing = before.get("latency")
    if not timing:
        return []
    lines = [f"latency measured in {timing['backend']} ({timing['threads']} threads), the two models in turns"]
    for key in (k for k in before if k.startswith("latency_ms_batch")):
        if after[key] > before[key]:
            lines.append(f"WARNING: the pruned model is slower than the original in {timing['backend']} at "
                         f"{key[11:].replace('batch', 'batch ')} (x{before[key] / after[key]:.2f}): widths that suit "
                         "the runtime help (pruning.round_to: 4, docs/results/latency.md)")
    noisy = [f"{name} {t['spread']:.0%}" for side in (before, after) for name, t in side["latency"].items()
             if isinstance(t, dict) and not t.get("trusted", True)]
    if noisy:
        lines.append(f"WARNING: latency varied too much to trust (interquartile range / median: {', '.join(noisy)}): "
                     "the machine was busy; time again on an idle machine or with more output.latency_repeats")
    return lines


def quality_summary(q: dict, metric: str, steps: int) -> list[str]:
    """The lines a quality target adds to the run summary: what was chosen, the validation drop
    and its bound, the test drop, the worst class on both, the measured speed-up, the search."""
    v, t, worst = q["validation"], q["test"], q["worst_class"]
    limit = " and ".join(f"{name} {q[key]:g}" for key, name in (("max_drop", "<="), ("max_class_drop", "per class <="))
                         if q[key] is not None)
    lines = [f"quality target: {q['target']} ({q['method']} bound on {q['validation_samples']} validation samples)",
             f"  chosen: {steps} of {q['plan_steps']} steps, {q['params_removed_ratio']:.1%} of parameters removed, "
             f"measured speed-up x{q['speedup_batch1']:.2f} (batch 1)",
             f"  validation: {metric} {v['before']:.2%} -> {v['after']:.2%}, drop {v['drop']:+.2f} pt, "
             f"upper bound {v['bound']:.2f} pt ({limit} asked)",
             f"  test split (measured, never used to choose): {metric} {t['before']:.2%} -> {t['after']:.2%}, "
             f"drop {t['drop']:+.2f} pt"]
    if worst is not None:
        test_drop = "n/a" if worst["test_drop"] is None else f"{worst['test_drop']:+.2f} pt"
        lines.append(f"  worst class: {worst['name']} ({worst['class']}): validation drop "
                     f"{worst['validation_drop']:+.2f} pt, bound {worst['validation_bound']:.2f} pt; "
                     f"test drop {test_drop}")
    if t.get("worst_class") is not None:
        tw = t["worst_class"]
        lines.append(f"  worst class on the test split: {tw['name']} ({tw['class']}), drop {tw['drop']:+.2f} pt")
    needed = q.get("samples_needed") or {}
    if needed:  # what the exact bound can show at this validation size, even with no answer changed
        fewest = min((c["samples"] for c in v["classes"].values()), default=v["samples"])
        have = {"max_drop": v["samples"], "max_class_drop": fewest}
        lines.append("  validation size: " + "; ".join(
            f"{key} {q[key]:g} needs >= {n} samples{' per class' if key == 'max_class_drop' else ''} (has {have[key]}"
            + (": too few, raise pruning.validation_per_class)" if have[key] < n else ")")
            for key, n in needed.items()))
    lines.append(f"  search: {q['replays']} replays in {q['search_seconds']:.1f} s "
                 "(class_metrics.png, quality_search.png)")
    if q.get("fastest"):  # prefer fastest: every prefix that met the target, timed in turns with the original
        timed = ", ".join(f"{r['steps']} steps x{r['speedup']:.2f}" for r in q["fastest"])
        lines.append(f"  prefer fastest: {len(q['fastest'])} prefixes met the target, timed at batch "
                     f"{q.get('latency_batch', 1)}: {timed}; kept {steps} steps")
    if q.get("message"):
        lines.append(f"  {q['message']}")
    return lines


def plot_class_metrics(q: dict, metric: str, path: Path) -> Path:
    """Per class: the metric of the original and of the pruned model on the test split (top),
    and, for a quality target, the upper bound of the class's drop on validation data with
    `max_class_drop` (bottom). `q`: report.json's `quality`, or any dict with its `test`,
    `target` and `params_removed_ratio` (every run's `per_class`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted(q["test"]["classes"], key=int)
    x = np.arange(len(classes))
    before = [100 * q["test"]["classes"][k]["before"] for k in classes]
    after = [100 * q["test"]["classes"][k]["after"] for k in classes]
    bounded = "validation" in q
    width = max(6.0, 0.6 * len(classes) + 2)
    fig, axes = plt.subplots(2 if bounded else 1, 1, figsize=(width, 5.6 if bounded else 3.8),
                             sharex=True, squeeze=False, gridspec_kw={"height_ratios": [3, 2] if bounded else [1]})
    top, bottom = axes[0, 0], axes[-1, 0]
    top.bar(x - 0.2, before, 0.4, label="original", color="#7f7f7f")
    top.bar(x + 0.2, after, 0.4, label="pruned", color="#d62728")
    top.set_ylabel(f"{metric}, test split (%)")
    top.set_ylim(max(0.0, min(before + after, default=0.0) - 10), 100)
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    top.set_title(f"{q['target']}: {q['params_removed_ratio']:.1%} of parameters removed", fontsize=10)
    if bounded:
        _plot_class_bounds(bottom, q, classes, x)
    bottom.set_xticks(x, [q["test"]["classes"][k]["name"] for k in classes], rotation=45, ha="right", fontsize=8)
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _plot_class_bounds(ax, q: dict, classes: list[str], x: np.ndarray) -> None:
    """A quality target's validation drop per class and its upper bound, with `max_class_drop`."""
    drops = [q["validation"]["classes"].get(k, {}).get("drop", np.nan) for k in classes]
    bounds = [q["validation"]["classes"].get(k, {}).get("bound", np.nan) for k in classes]
    ax.bar(x, bounds, 0.5, color="#ff9896", label=f"upper bound ({q['confidence']:.0%})")
    ax.plot(x, drops, "kD", markersize=4, label="drop")
    if q["max_class_drop"] is not None:
        ax.axhline(q["max_class_drop"], color="k", linestyle=":", linewidth=0.9, label="max_class_drop")
    ax.axhline(0, color="k", linewidth=0.6)
    ax.set_ylabel("drop, validation (points)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def plot_quality_search(q: dict, metric: str, path: Path) -> Path:
    """Every prefix the search replayed: the validation drop and its upper bound against the
    share of parameters removed, the target as a line, the chosen prefix circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace = sorted(q["trace"], key=lambda e: e["params_removed_ratio"])
    x = [100 * e["params_removed_ratio"] for e in trace]
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    ax.plot(x, [e["drop"] for e in trace], "o-", color="#1f77b4", label=f"{metric} drop, validation")
    ax.plot(x, [e["bound"] for e in trace], "s--", color="#d62728", label=f"upper bound ({q['confidence']:.0%})")
    for e, xe in zip(trace, x):
        if e["worst_class"] is not None:
            ax.plot(xe, e["worst_class"]["bound"], "v", color="#7f7f7f", markersize=4)
    ax.plot([], [], "v", color="#7f7f7f", label="worst class's bound")
    if q["max_drop"] is not None:
        ax.axhline(q["max_drop"], color="k", linestyle=":", label=f"max_drop {q['max_drop']:g}")
    if q["max_class_drop"] is not None:
        ax.axhline(q["max_class_drop"], color="#7f7f7f", linestyle=":", label=f"max_class_drop {q['max_class_drop']:g}")
    ax.plot(100 * q["params_removed_ratio"], q["validation"]["bound"], "o", markersize=14, fillstyle="none",
            color="k", label="chosen")
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel("drop (points)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"quality search: {q['replays']} replays")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- curves ---------------------------------------------------------------------------

@dataclass
class CurveResult:
    metric: str
    unpruned: float
    params_total: int
    rows: list[dict]  # one per (criterion, seed, ratio)
    analyses: list[dict]  # one per (criterion, seed): seconds, categories, SAUCE, reachable
    class_names: list[str] | None = None  # per-class curves (`class_<k>` in the rows), where the data names them

    def sauce_table(self) -> list[dict]:
        out = []
        for label in dict.fromkeys(a["criterion"] for a in self.analyses):
            runs = [a for a in self.analyses if a["criterion"] == label]
            values = np.array([a["sauce"] for a in runs])
            out.append({"criterion": label, "sauce_mean": float(values.mean()),
                        "sauce_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                        "seeds": len(runs), "max_params_ratio": float(np.mean([a["max_params_ratio"] for a in runs])),
                        "analysis_seconds": float(np.mean([a["seconds"] for a in runs]))})
        return out


def sauce_markdown(result: CurveResult, title: str = "SAUCE") -> str:
    lines = [f"# {title}", "",
             f"Unpruned {result.metric}: {100 * result.unpruned:.2f} %. SAUCE = area under {result.metric} (%) "
             "vs fraction of parameters removed; nothing is counted beyond the last reachable ratio.", "",
             "| criterion | SAUCE (mean ± std) | seeds | max params removed | analysis s |",
             "|---|---|---|---|---|"]
    for r in sorted(result.sauce_table(), key=lambda r: -r["sauce_mean"]):
        lines.append(f"| {r['criterion']} | {r['sauce_mean']:.1f} ± {r['sauce_std']:.1f} | {r['seeds']} | "
                     f"{100 * r['max_params_ratio']:.1f} % | {r['analysis_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def rows_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# twelve colours that stay apart (tab10 without its red, plus two), C-SWAP's red kept for it
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
            "#000080", "#6b8e23", "#ff1493")
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "h", "*", "p", "d")  # 13: coprime with 12 colours
_LINES = ("-", "--", "-.", ":")
CSWAP_STYLE = {"color": "#d62728", "marker": "o", "linestyle": "-", "linewidth": 2.2, "zorder": 10}


def curve_styles(labels) -> dict[str, dict]:
    """A distinct (colour, marker, line style) per criterion, whatever their number; C-SWAP
    (`cswap`, `cswap/layer`, ...) in its own red, thick and drawn above everything else."""
    styles, k = {}, 0
    for label in labels:
        if label.split("/")[0] == "cswap" and not any(s["zorder"] == CSWAP_STYLE["zorder"] for s in styles.values()):
            styles[label] = dict(CSWAP_STYLE)
            continue
        styles[label] = {"color": _COLOURS[k % len(_COLOURS)], "marker": _MARKERS[k % len(_MARKERS)],
                         "linestyle": _LINES[k % len(_LINES)], "linewidth": 1.3, "zorder": 3}
        k += 1
    return styles


def curve_figure(result: CurveResult, title: str = "", x_key: str = "params_ratio"):
    """Mean metric vs mean parameters removed (or measured speed-up, `x_key="speedup"`) per
    criterion (band: ± std over seeds), Fig. 5 style: one style per criterion (`curve_styles`),
    the legend outside the axes so it hides no point, and y-limits around the data with a
    margin so no line lies on the frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 4.4))
    labels = list(dict.fromkeys(r["criterion"] for r in result.rows))
    styles, low, high = curve_styles(labels), [100 * result.unpruned], [100 * result.unpruned]
    for label in labels:
        mine = [r for r in result.rows if r["criterion"] == label]
        x, y, s = [], [], []
        for t in sorted({r["target_ratio"] for r in mine}):
            pts = [r for r in mine if r["target_ratio"] == t]
            vals = [100 * p[result.metric] for p in pts]
            x.append((100 if x_key == "params_ratio" else 1) * np.mean([p[x_key] for p in pts]))
            y.append(np.mean(vals))
            s.append(np.std(vals))
        style = styles[label]
        ax.plot(x, y, label=label, markersize=4, **style)
        ax.fill_between(x, np.array(y) - s, np.array(y) + s, color=style["color"], alpha=0.12, zorder=style["zorder"] - 1)
        low.append(min(np.array(y) - s))
        high.append(max(np.array(y) + s))
    ax.axhline(100 * result.unpruned, color="k", linestyle=(0, (4, 3)), linewidth=0.9, label="unpruned", zorder=2)
    margin = max(1.0, 0.05 * (max(high) - min(low)))
    ax.set_ylim(min(low) - margin, max(high) + margin)
    if x_key == "params_ratio":
        ax.set_xlim(-2, 102)
    ax.set_xlabel("parameters removed (%)" if x_key == "params_ratio" else "measured speed-up, batch 1 (x)")
    ax.set_ylabel(f"{result.metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_curves(result: CurveResult, path: Path, title: str = "", x_key: str = "params_ratio") -> Path:
    """`curve_figure` written to `path` (the legend beside the axes included)."""
    import matplotlib.pyplot as plt

    fig = curve_figure(result, title, x_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_curve_outputs(result: CurveResult, out: Path, title: str, meta: dict) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "csv": write_text_atomic(out / "curve.csv", rows_csv(result.rows)),
        "json": write_text_atomic(out / "curve.json", json_text(
            {**meta, **asdict(result), "sauce": result.sauce_table()})),
        "md": write_text_atomic(out / "sauce.md", sauce_markdown(result, f"SAUCE: {title}")),
    }
    files["png"] = plot_curves(result, out / "curve.png", title)
    if result.rows and "speedup" in result.rows[0]:  # `cswap curve --latency`
        files["latency_png"] = plot_curves(result, out / "curve_latency.png", title, x_key="speedup")
    if result.rows and "class_0" in result.rows[0]:  # `cswap curve --per-class`
        files["per_class_png"] = plot_class_curves(result, out / "curve_per_class.png", title)
    return files


def plot_class_curves(result: CurveResult, path: Path, title: str = "") -> Path:
    """Every class's metric against the parameters removed, one panel per criterion (means over
    seeds): where a criterion's mean curve hides one class collapsing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["criterion"] for r in result.rows))
    keys = sorted((k for k in result.rows[0] if k.startswith("class_")  # a class absent from the data: not drawn
                   and any(np.isfinite(float(r[k])) for r in result.rows)), key=lambda k: int(k[6:]))
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels) + 1.6, 3.8), sharey=True, squeeze=False)
    for ax, label in zip(axes[0], labels):
        mine = [r for r in result.rows if r["criterion"] == label]
        shares = sorted({r["target_ratio"] for r in mine})
        x = [100 * np.mean([r["params_ratio"] for r in mine if r["target_ratio"] == t]) for t in shares]
        for i, key in enumerate(keys):
            y = [100 * np.nanmean([r[key] for r in mine if r["target_ratio"] == t]) for t in shares]
            k = int(key[6:])
            name = result.class_names[k] if result.class_names and k < len(result.class_names) else key[6:]
            ax.plot(x, y, color=_COLOURS[i % len(_COLOURS)], linestyle=_LINES[(i // len(_COLOURS)) % len(_LINES)],
                    marker=_MARKERS[i % len(_MARKERS)], markersize=3, linewidth=1.1, label=name)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("parameters removed (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{result.metric} per class (%)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ---- sweeps ---------------------------------------------------------------------------

def summarize(rows: list[dict]) -> list[dict]:
    """Mean (and std of SAUCE) over seeds for each setting, in the order the settings ran."""
    metric_key = next(k for k in rows[0] if k.startswith("noncritical_") and k not in ("noncritical_units",
                                                                                       "noncritical_params_ratio"))
    measured = ("seed", "neutral", "detrimental", "critical", "inconclusive", "noncritical_units",
                "noncritical_params_ratio", "sauce", metric_key, f"unpruned_{metric_key[len('noncritical_'):]}")
    setting_keys = [k for k in rows[0] if k not in measured]
    out = []
    for key in dict.fromkeys(tuple(r[k] for k in setting_keys) for r in rows):
        mine = [r for r in rows if tuple(r[k] for k in setting_keys) == key]
        mean = {k: float(np.mean([r.get(k, 0) for r in mine])) for k in  # inconclusive: absent from older sweeps
                ("neutral", "detrimental", "critical", "inconclusive", "noncritical_params_ratio", metric_key, "sauce")}
        sd = float(np.std([r["sauce"] for r in mine], ddof=1)) if len(mine) > 1 else 0.0
        out.append({**dict(zip(setting_keys, key)), "seeds": len(mine), **mean, "sauce_std": sd,
                    "metric_key": metric_key})
    return out


def sweep_markdown(summary: list[dict], title: str, unpruned: float) -> str:
    mk = summary[0]["metric_key"]
    metric = mk[len("noncritical_"):]
    settings = _setting_keys(summary)
    lines = [f"# C-SWAP settings sweep: {title}", "",
             f"Unpruned {metric}: {100 * unpruned:.2f} %. Counts are means over seeds; "
             "'non-critical only' is the model C-SWAP returns without a target.", "",
             "| " + " | ".join(_column(k) for k in settings) + " | seeds | neutral | detrimental | critical | "
             f"inconclusive | non-critical only: params removed | non-critical only: {metric} | SAUCE |",
             "|" + "---|" * (len(settings) + 8)]
    for s in summary:
        cells = [f"{s[k]:g}" if isinstance(s[k], float) else str(s[k]) for k in settings]
        lines.append("| " + " | ".join(cells) + f" | {s['seeds']} | {s['neutral']:.1f} | {s['detrimental']:.1f} | "
                     f"{s['critical']:.1f} | {s['inconclusive']:.1f} | {100 * s['noncritical_params_ratio']:.1f} % | "
                     f"{100 * s[mk]:.2f} % | "
                     f"{s['sauce']:.1f} ± {s['sauce_std']:.1f} |")
    return "\n".join(lines) + "\n"


def _setting_keys(summary: list[dict]) -> list[str]:
    """The keys of a sweep summary row that name its setting (alpha, M_k, test options)."""
    measured = {"seeds", "neutral", "detrimental", "critical", "inconclusive", "noncritical_params_ratio", "sauce",
                "sauce_std", "metric_key", summary[0]["metric_key"]}
    return [k for k in summary[0] if k not in measured]


def _column(key: str) -> str:
    return {"samples_per_class": "M_k"}.get(key, key)


def plot_sweep(summary: list[dict], path: Path, title: str) -> Path:
    """SAUCE, non-critical-only params removed and metric against alpha, one line per other setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mk = summary[0]["metric_key"]
    others = [k for k in _setting_keys(summary) if k != "alpha"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for key in dict.fromkeys(tuple(s[k] for k in others) for s in summary):
        mine = sorted((s for s in summary if tuple(s[k] for k in others) == key), key=lambda s: s["alpha"])
        a = [s["alpha"] for s in mine]
        label = ", ".join(f"{_column(k)}={v}" for k, v in zip(others, key))
        axes[0].plot(a, [s["sauce"] for s in mine], marker="o", label=label)
        axes[1].plot(a, [100 * s["noncritical_params_ratio"] for s in mine], marker="o", label=label)
        axes[2].plot(a, [100 * s[mk] for s in mine], marker="o", label=label)
    for ax, ylabel in zip(axes, ("SAUCE", "non-critical only: params removed (%)", f"non-critical only: {mk[12:]} (%)")):
        ax.set_xscale("log")
        ax.set_xlabel("alpha")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_sweep_outputs(rows: list[dict], out: Path, title: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    unpruned = next(v for k, v in rows[0].items() if k.startswith("unpruned_"))
    return {
        "csv": write_text_atomic(out / "sweep.csv", rows_csv(rows)),
        "json": write_text_atomic(out / "sweep.json", json_text({"rows": rows, "summary": summary})),
        "md": write_text_atomic(out / "sweep.md", sweep_markdown(summary, title, unpruned)),
        "png": plot_sweep(summary, out / "sweep.png", title),
    }
