"""`cswap sweep`: C-SWAP's statistics settings side by side (alpha, M_k, test options), paper Fig. 6.

For every setting (and seed) one C-SWAP analysis is run; the report gives the category
counts, the metric and parameter ratio of the "non-critical only" model (what C-SWAP prunes
without a target), and SAUCE of the full curve, so a user can choose alpha for their model.
A setting changes the test only through the interface (`SignificanceTest.with_alpha`) and
the task only through `Task.manifold(seed, samples_per_class)`; other test options (e.g. the
stock test's `voting`) are passed to the configured test by name, so any registered test
works. The model, its units and the adapter are built once for all settings.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from tqdm.auto import tqdm

from . import registry
from .build import analysis_from_config
from .config import PluginRef, RunConfig
from .curves import DEFAULT_RATIOS, replay_curve
from .interfaces import Analysis
from .options import Target
from .plan import PruningPlan
from .pruner import progressive_prune
from .replay import ReplayData, replay_steps
from .sauce import sauce

CATEGORIES = ("neutral", "detrimental", "critical", "inconclusive")  # counted per row


@dataclass(frozen=True)
class Setting:
    alpha: float
    samples_per_class: int | None = None  # None: the task's own M_k
    test_options: tuple[tuple[str, object], ...] = ()  # other options of the configured test

    @property
    def label(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.test_options)
        return f"alpha={self.alpha:g} M={self.samples_per_class}" + (f" {extra}" if extra else "")


def settings(alphas, samples, test_grid: dict[str, list] | None = None) -> list[Setting]:
    """Every combination of alpha, M_k and the values of each test option in `test_grid`."""
    keys = list(test_grid or {})
    combos = itertools.product(*[test_grid[k] for k in keys]) if keys else [()]
    return [Setting(a, m, tuple(zip(keys, values)))
            for a, m, values in itertools.product(alphas, samples, list(combos))]


def run_sweep(cfg: RunConfig, grid: list[Setting], seeds: int = 1, ratios=DEFAULT_RATIOS,
              progress: bool = True) -> list[dict]:
    test_ref = cfg.test or PluginRef(name=registry.load("tasks", cfg.task.name).default_test)
    tests = {s: registry.create("tests", test_ref.name, {**test_ref.options, **dict(s.test_options)}).with_alpha(s.alpha)
             for s in grid}  # every setting validated by the test's own options, before any analysis
    base, _ = analysis_from_config(cfg)
    unpruned = base.task.evaluate(base.model)[base.task.metric]  # the eval split does not depend on M_k
    rows = []
    jobs = [(s, cfg.seed + i) for s in grid for i in range(seeds)]
    for setting, seed in tqdm(jobs, desc="sweep", unit="analysis", disable=not progress):
        analysis = replace(base, test=tests[setting])
        rows.append(_row(analysis, setting, seed, ratios, unpruned, cfg.pruning.target))
    return rows


def _row(a: Analysis, setting: Setting, seed: int, ratios, unpruned: float, target: Target) -> dict:
    plan = PruningPlan.from_analysis(a, progressive_prune(a, seed, samples_per_class=setting.samples_per_class))
    metric, k = a.task.metric, plan.num_noncritical
    removed = plan.cumulative_params_removed()
    data = ReplayData.for_task(a.task, plan, target)  # this setting's S: the plan's seed and M_k
    noncritical = (a.task.evaluate(replay_steps(plan, a.model, k, target, data, adapter=a.adapter).model)[metric]
                   if k else unpruned)
    curve = replay_curve(a.model, plan, a.task, ratios, a.adapter, metric, unpruned, target=target, data=data)
    counts = plan.category_counts()
    return {
        "alpha": setting.alpha, "samples_per_class": setting.samples_per_class or a.task.samples_per_class,
        # a test option named like a count (`neutral: equivalent`) keeps its value under `test.<name>`
        **{(f"test.{k}" if k in CATEGORIES else k): v for k, v in setting.test_options}, "seed": seed,
        "neutral": counts.get("neutral", 0), "detrimental": counts.get("detrimental", 0),
        "critical": counts.get("critical", 0), "inconclusive": counts.get("inconclusive", 0), "noncritical_units": k,
        "noncritical_params_ratio": removed[k] / plan.params_total,
        f"noncritical_{metric}": noncritical, f"unpruned_{metric}": unpruned,
        "sauce": sauce([r["params_ratio"] for r in curve], [100 * r[metric] for r in curve]),
    }
