"""Never silently at chance (issue #27): what a run says when its replay left a bottleneck
narrower than its floor, or the pruned model near chance on S.

A target beyond the kept tail's floors thins a layer that every path from input to output
crosses, and no repair widens it again; a model that keeps almost none of its margin over
chance still exits 0 unless someone says so. Both are checked once, after the replay, and
go into report.json (`collapse`) and the run summary with the layer's name and width. The
layers are read from the plan's record (`cswap.tail_order.kept_tail`: its floor and probed
bottlenecks); a plan without one (the paper's order, an older plan) is checked with the
default floor on the bottlenecks probed now. Accuracy is measured on S, the samples the analysis judged
on, for tasks whose metric is accuracy; other tasks are checked on their layers alone.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .interfaces import Manifold, Task, Unit, UnitGraph
from .options import MinWidth
from .tail_order import bottleneck_layers, layers_below_floor, widths_after

NEAR_CHANCE = 0.25  # near chance: less than this share of the unpruned model's margin over chance kept on S


def thin_layers(plan, removed: Iterable[Unit], floor: MinWidth, bottlenecks: Iterable[str] | None) -> list[dict]:
    """The `bottlenecks` (None: every layer) the removal of `removed` leaves below `floor`, most
    thinned first."""
    after = widths_after(plan.layers, (u.layer for u in removed))
    return [{"layer": t.name, "width": t.width_after, "of": t.width_before, "floor": t.floor}
            for t in layers_below_floor(plan.layers, after, floor, bottlenecks)]


def collapse(plan, removed: list[Unit], task: Task, model: nn.Module, graph: UnitGraph, pruned: nn.Module,
             sample_set: Manifold, device: torch.device | str) -> dict:
    """report.json's `collapse`: the thin layers, the accuracy on S before and after and
    chance (the largest class's share of S), and the warning lines the run summary prints."""
    floor = MinWidth(**plan.meta["min_width"]) if "min_width" in plan.meta else MinWidth()
    if floor.trivial:  # a plan never removes a layer's last unit: nothing can be below this floor
        out: dict = {"thin_layers": []}
    else:
        bottlenecks = plan.meta["bottlenecks"] if "bottlenecks" in plan.meta else bottleneck_layers(model, graph)
        out = {"thin_layers": thin_layers(plan, removed, floor, bottlenecks)}
    if task.metric == "accuracy" and task.measures_outcomes:
        counts = sample_set.class_counts
        out["chance"] = max(counts.values()) / max(sum(counts.values()), 1)
        out["s_accuracy_before"] = task.outcomes(model, device, sample_set).metric()
        out["s_accuracy_after"] = task.outcomes(pruned, device, sample_set).metric()
    out["lines"] = collapse_lines(out)
    return out


def collapse_lines(c: dict) -> list[str]:
    """The run summary's warnings for a `collapse` record (nothing when all is well)."""
    lines = []
    if c["thin_layers"]:
        named = ", ".join(f"{t['layer']} {t['width']}/{t['of']} (floor {t['floor']})" for t in c["thin_layers"][:5])
        more = f" and {len(c['thin_layers']) - 5} more" if len(c["thin_layers"]) > 5 else ""
        lines.append(f"WARNING: the target thinned {len(c['thin_layers'])} bottleneck layer(s) below their floor "
                     f"(pruning.min_width): {named}{more}; no repair widens them again, a smaller target keeps them")
    if near_chance(c):
        lines.append(f"WARNING: the pruned model is near chance on S: {c['s_accuracy_after']:.1%} accuracy "
                     f"(chance {c['chance']:.1%}, unpruned {c['s_accuracy_before']:.1%})"
                     + (f"; narrowest: {c['thin_layers'][0]['layer']} {c['thin_layers'][0]['width']}/"
                        f"{c['thin_layers'][0]['of']}" if c["thin_layers"] else ""))
    return lines


def near_chance(c: dict) -> bool:
    """Whether the pruned model kept less than NEAR_CHANCE of the unpruned one's margin over
    chance on S (False where accuracy was not measured, or the unpruned model had no margin)."""
    if "s_accuracy_after" not in c:
        return False
    margin = c["s_accuracy_before"] - c["chance"]
    return margin > 0 and c["s_accuracy_after"] - c["chance"] < NEAR_CHANCE * margin
