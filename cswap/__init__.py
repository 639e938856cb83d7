"""C-SWAP: causal, explainability-aware, one-shot structured pruning (arXiv 2510.18636).

    plan = cswap.analyze(model, (images, labels), samples_per_class=64)
    small = plan.apply(model)                  # non-critical units removed, physically
    small = plan.apply(model, params_ratio=.5) # then critical ones, least beneficial first
    plan.save("plan.json"); plan = cswap.PruningPlan.load("plan.json")
"""
from .api import analyze
from .interfaces import (
    ArchitectureAdapter, Criterion, Decision, Manifold, Scores, ScoringFunction, SignificanceTest, Task,
)
from .plan import PlanStep, PruningPlan
from .run import load_pruned, run_prune
from .units import Unit

__version__ = "0.1.0"
__all__ = [
    "analyze", "load_pruned", "run_prune", "PruningPlan", "PlanStep", "Unit",
    "ArchitectureAdapter", "Criterion", "Decision", "Manifold", "Scores", "ScoringFunction",
    "SignificanceTest", "Task",
]
