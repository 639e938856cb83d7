"""Everything the commands write for a person to read: tables, CSV, JSON and plots.

`cswap prune` and the demo print `run_summary`; `cswap curve` writes `write_curve_outputs`
(curve.csv, curve.json, sauce.md, curve.png); `cswap sweep` writes `write_sweep_outputs`
(sweep.csv, sweep.json, sweep.md, sweep.png). Files are written atomically.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .files import write_text_atomic


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
        f"{c.get('untested', 0)} kept as last of their layer; {report['units_removed']} removed"
    )
    repair = f", recovery {recovery['seconds']:.1f} s" if recovery else ""
    lines.append(f"analysis {report['analysis_seconds']:.1f} s{repair}, total {report['total_seconds']:.1f} s")
    return "\n".join(lines)


# ---- curves ---------------------------------------------------------------------------

@dataclass
class CurveResult:
    metric: str
    unpruned: float
    params_total: int
    rows: list[dict]  # one per (criterion, seed, ratio)
    analyses: list[dict]  # one per (criterion, seed): seconds, categories, SAUCE, reachable

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
        "json": write_text_atomic(out / "curve.json", json.dumps(
            {**meta, **asdict(result), "sauce": result.sauce_table()}, indent=1) + "\n"),
        "md": write_text_atomic(out / "sauce.md", sauce_markdown(result, f"SAUCE: {title}")),
    }
    files["png"] = plot_curves(result, out / "curve.png", title)
    if result.rows and "speedup" in result.rows[0]:  # `cswap curve --latency`
        files["latency_png"] = plot_curves(result, out / "curve_latency.png", title, x_key="speedup")
    return files


# ---- sweeps ---------------------------------------------------------------------------

def summarize(rows: list[dict]) -> list[dict]:
    """Mean (and std of SAUCE) over seeds for each setting, in the order the settings ran."""
    metric_key = next(k for k in rows[0] if k.startswith("noncritical_") and k not in ("noncritical_units",
                                                                                       "noncritical_params_ratio"))
    measured = ("seed", "neutral", "detrimental", "critical", "noncritical_units", "noncritical_params_ratio",
                "sauce", metric_key, f"unpruned_{metric_key[len('noncritical_'):]}")
    setting_keys = [k for k in rows[0] if k not in measured]
    out = []
    for key in dict.fromkeys(tuple(r[k] for k in setting_keys) for r in rows):
        mine = [r for r in rows if tuple(r[k] for k in setting_keys) == key]
        mean = {k: float(np.mean([r[k] for r in mine])) for k in
                ("neutral", "detrimental", "critical", "noncritical_params_ratio", metric_key, "sauce")}
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
             f"non-critical only: params removed | non-critical only: {metric} | SAUCE |",
             "|" + "---|" * (len(settings) + 7)]
    for s in summary:
        cells = [f"{s[k]:g}" if isinstance(s[k], float) else str(s[k]) for k in settings]
        lines.append("| " + " | ".join(cells) + f" | {s['seeds']} | {s['neutral']:.1f} | {s['detrimental']:.1f} | "
                     f"{s['critical']:.1f} | {100 * s['noncritical_params_ratio']:.1f} % | {100 * s[mk]:.2f} % | "
                     f"{s['sauce']:.1f} ± {s['sauce_std']:.1f} |")
    return "\n".join(lines) + "\n"


def _setting_keys(summary: list[dict]) -> list[str]:
    """The keys of a sweep summary row that name its setting (alpha, M_k, test options)."""
    measured = {"seeds", "neutral", "detrimental", "critical", "noncritical_params_ratio", "sauce", "sauce_std",
                "metric_key", summary[0]["metric_key"]}
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
        "json": write_text_atomic(out / "sweep.json", json.dumps({"rows": rows, "summary": summary}, indent=1) + "\n"),
        "md": write_text_atomic(out / "sweep.md", sweep_markdown(summary, title, unpruned)),
        "png": plot_sweep(summary, out / "sweep.png", title),
    }
