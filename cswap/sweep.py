"""`cswap sweep`: C-SWAP's statistics settings side by side (alpha, voting, M_k), paper Fig. 6.

For every setting (and seed) one C-SWAP analysis is run; the report gives the category
counts, the accuracy and parameter ratio of the "non-critical only" model (what C-SWAP
prunes without a target), and SAUCE of the full curve, so a user can choose alpha for their
model. Outputs `sweep.csv`, `sweep.json`, `sweep.md` and `sweep.png` in the output folder.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import registry
from .build import build_task
from .config import PluginRef, RunConfig
from .curves import DEFAULT_RATIOS, replay_curve, rows_csv, setup_from_config
from .files import write_text_atomic
from .sauce import sauce


@dataclass(frozen=True)
class Setting:
    alpha: float
    voting: str
    samples_per_class: int

    @property
    def label(self) -> str:
        return f"alpha={self.alpha:g} {self.voting} M={self.samples_per_class}"


def settings(alphas, votings, samples) -> list[Setting]:
    return [Setting(a, v, m) for a, v, m in itertools.product(alphas, votings, samples)]


def run_sweep(cfg: RunConfig, grid: list[Setting], seeds: int = 1, ratios=DEFAULT_RATIOS,
              progress: bool = True) -> list[dict]:
    rows = []
    jobs = [(s, cfg.seed + i) for s in grid for i in range(seeds)]
    base = setup_from_config(cfg)  # model, units and adapter are shared by every setting
    test_ref = cfg.test or PluginRef(name=base.task.default_test)
    unpruned = base.task.evaluate(base.model)[base.task.metric]  # the eval split does not depend on M_k
    for setting, seed in tqdm(jobs, desc="sweep", unit="analysis", disable=not progress):
        task = build_task(cfg.task.model_copy(
            update={"options": {**cfg.task.options, "samples_per_class": setting.samples_per_class}}))
        test = registry.create("tests", test_ref.name,
                               {**test_ref.options, "alpha": setting.alpha, "voting": setting.voting})
        s = replace(base, task=task, context={**base.context, "test": test})
        metric = s.task.metric
        criterion = registry.create("criteria", "cswap", {}, adapter=s.adapter_name, **s.context)
        plan = criterion.plan(s.model, s.graph, s.task, seed)
        k = plan.num_noncritical
        removed = plan.cumulative_params_removed()
        noncritical = s.task.evaluate(plan.apply_prefix(s.model, k, adapter=s.adapter))[metric] if k else unpruned
        curve = replay_curve(s.model, plan, s.task, ratios, s.adapter, metric, unpruned)
        counts = plan.category_counts()
        rows.append({
            "alpha": setting.alpha, "voting": setting.voting, "samples_per_class": setting.samples_per_class,
            "seed": seed, "neutral": counts.get("neutral", 0), "detrimental": counts.get("detrimental", 0),
            "critical": counts.get("critical", 0), "noncritical_units": k,
            "noncritical_params_ratio": removed[k] / plan.params_total,
            f"noncritical_{metric}": noncritical, f"unpruned_{metric}": unpruned,
            "sauce": sauce([r["params_ratio"] for r in curve], [100 * r[metric] for r in curve]),
        })
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean (and std of SAUCE) over seeds for each setting, in the order the settings ran."""
    keys = list(dict.fromkeys((r["alpha"], r["voting"], r["samples_per_class"]) for r in rows))
    metric_key = next(k for k in rows[0] if k.startswith("noncritical_") and k not in ("noncritical_units", "noncritical_params_ratio"))
    out = []
    for a, v, m in keys:
        mine = [r for r in rows if (r["alpha"], r["voting"], r["samples_per_class"]) == (a, v, m)]
        mean = {k: float(np.mean([r[k] for r in mine])) for k in
                ("neutral", "detrimental", "critical", "noncritical_params_ratio", metric_key, "sauce")}
        sd = float(np.std([r["sauce"] for r in mine], ddof=1)) if len(mine) > 1 else 0.0
        out.append({"alpha": a, "voting": v, "samples_per_class": m, "seeds": len(mine), **mean, "sauce_std": sd,
                    "metric_key": metric_key})
    return out


def sweep_markdown(summary: list[dict], title: str, unpruned: float) -> str:
    mk = summary[0]["metric_key"]
    lines = [f"# C-SWAP settings sweep: {title}", "",
             f"Unpruned {mk[len('noncritical_'):]}: {100 * unpruned:.2f} %. Counts are means over seeds; "
             "'non-critical only' is the model C-SWAP returns without a target.", "",
             "| alpha | voting | M_k | seeds | neutral | detrimental | critical | non-critical only: params removed | "
             f"non-critical only: {mk[len('noncritical_'):]} | SAUCE |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['alpha']:g} | {s['voting']} | {s['samples_per_class']} | {s['seeds']} | {s['neutral']:.1f} | "
                     f"{s['detrimental']:.1f} | {s['critical']:.1f} | {100 * s['noncritical_params_ratio']:.1f} % | "
                     f"{100 * s[mk]:.2f} % | {s['sauce']:.1f} ± {s['sauce_std']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_sweep(summary: list[dict], path: Path, title: str) -> Path:
    """SAUCE and non-critical-only params removed against alpha, one line per (voting, M_k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mk = summary[0]["metric_key"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for v, m in dict.fromkeys((s["voting"], s["samples_per_class"]) for s in summary):
        mine = sorted((s for s in summary if (s["voting"], s["samples_per_class"]) == (v, m)), key=lambda s: s["alpha"])
        a = [s["alpha"] for s in mine]
        label = f"{v}, M={m}"
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
