"""C-SWAP: causal, explainability-aware, one-shot structured pruning (arXiv 2510.18636).

    plan = cswap.analyze(model, (images, labels), samples_per_class=64)
    small = plan.apply(model)                  # non-critical units removed, physically
    small = plan.apply(model, params_ratio=.5) # then critical ones, least harm per parameter first
    plan.save("plan.json"); plan = cswap.PruningPlan.load("plan.json")

The layers, the data flow of a run and how to add a plugin: docs/design.md.
"""
from .api import analyze
from .interfaces import (
    Analysis,
    ArchitectureAdapter,
    Criterion,
    Decision,
    Manifold,
    PlanStep,
    Ranking,
    Scores,
    ScoringFunction,
    SignificanceTest,
    Task,
    Unit,
    UnitGraph,
)
from .options import FastOptions, PruningOptions
from .plan import PruningPlan
from .export import load_pruned, save_pruned
from .run import run_prune

__version__ = "0.1.0"
__all__ = [
    "analyze", "load_pruned", "save_pruned", "run_prune", "PruningPlan", "PruningOptions", "FastOptions", "PlanStep", "Ranking",
    "Unit", "UnitGraph", "Analysis", "ArchitectureAdapter", "Criterion", "Decision", "Manifold", "Scores",
    "ScoringFunction", "SignificanceTest", "Task",
]
