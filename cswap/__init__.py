"""C-SWAP: causal, explainability-aware, one-shot structured pruning (arXiv 2510.18636).

    plan = cswap.analyze(model, (images, labels), samples_per_class=64)   # what the analysis found
    small = plan.apply(model, data=(images, labels))   # non-critical units removed, repaired on S
    small = plan.apply(model, params_ratio=.5, data=(images, labels))  # then critical ones
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
from .options import AnalysisOptions, FastOptions, PruningOptions, RecoveryOptions, Target
from .plan import PruningPlan
from .export import load_pruned, save_pruned
from .run import run_prune
from .trust import trust_python_configs

__version__ = "0.1.0"
__all__ = [
    "analyze", "load_pruned", "save_pruned", "run_prune", "PruningPlan", "AnalysisOptions", "Target", "RecoveryOptions",
    "PruningOptions", "FastOptions", "PlanStep", "Ranking", "trust_python_configs",
    "Unit", "UnitGraph", "Analysis", "ArchitectureAdapter", "Criterion", "Decision", "Manifold", "Scores",
    "ScoringFunction", "SignificanceTest", "Task",
]
