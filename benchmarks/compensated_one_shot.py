"""Progressive vs one-shot compensated cuts (issue #16, item 2): does the walk matter?

    python benchmarks/compensated_one_shot.py        # the demo ResNet-8, ~3 minutes on one core

One-shot: every unit cut once on the *unpruned* model with the least-squares compensation,
ranked globally by the drop of the mean sigma (smallest first), replayed with the same
compensation, each unit's correction computed as if it were the only one removed. Progressive:
C-SWAP's walk with `intervention: least_squares`, where every committed removal's update (and
the downdate of its readers' inverse Gram) is in place before the next trial. Both replayed
without any further recovery, so the only difference is how the compensations add up.
Prints accuracy at 30 / 50 / 70 % of parameters removed; docs/results/recovery.md quotes it.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cswap.build import analysis_from_config  # noqa: E402
from cswap.compensation import make_intervention  # noqa: E402
from cswap.demo import demo_config  # noqa: E402
from cswap.engine import make_engine  # noqa: E402
from cswap.interfaces import RANKED, PlanStep  # noqa: E402
from cswap.plan import PruningPlan  # noqa: E402
from cswap.pruner import progressive_prune  # noqa: E402
from cswap.options import Target  # noqa: E402
from cswap.replay import prune  # noqa: E402


def one_shot_plan(a, sample_set) -> PruningPlan:
    work = copy.deepcopy(a.model).eval()
    intervention = make_intervention("least_squares", work, a.units, a.model, sample_set, a.options.ridge)
    engine = make_engine("full", work, a.scorer, sample_set, a.units, device=a.device, intervention=intervention)
    base = float(engine.baseline().values.mean())
    harm = {u: base - float(engine.trial(u).values.mean()) for layer in a.units.layers for u in layer.units()}
    steps = [PlanStep(u, RANKED, score=h) for u, h in sorted(harm.items(), key=lambda kv: kv[1])]
    return PruningPlan.build(a.model, a.units, steps, method="one_shot_ls", adapter=a.adapter_name, seed=0,
                             intervention="least_squares", ridge=a.options.ridge)


def main() -> None:
    torch.set_num_threads(1)
    a, _ = analysis_from_config(demo_config(overrides=["pruning.recovery=none"]))
    sample_set = a.task.manifold(0)
    progressive_a = replace(a, options=a.options.model_copy(update={"intervention": "least_squares"}))
    plans = {"progressive": PruningPlan.from_analysis(a, progressive_prune(progressive_a, 0)),
             "one-shot": one_shot_plan(a, sample_set)}
    for name, plan in plans.items():
        cells = []
        for ratio in (0.3, 0.5, 0.7):
            target = Target(params_ratio=ratio, recovery="none")  # the compensated cut alone, no further recovery
            out = prune(plan, a.model, target, sample_set, adapter=a.adapter, graph=a.units)
            cells.append(f"{ratio:.0%}: {100 * a.task.evaluate(out.model)['accuracy']:.2f} %")
        print(f"{name:<12} " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
