"""The record saved beside a pruned model (`pruned.json`): the steps and the target that made it.

Why a file of its own: plan.json is the analysis and stays the same for every target; the
pruned model is one replay of it. To rebuild that model's shape in a fresh process (and
nothing else: its weights, compensated and repaired, are in `pruned_model.pt`), a loader
needs the number of steps replayed and the target (its `round_to` changes which units those
steps remove). `cswap prune` and `cswap.save_pruned` write the same record, so
`cswap.load_pruned` and `cswap export` read every folder the same way. The widths are
recorded too, so a rebuild that comes out different is refused instead of loading weights
into the wrong layers. The record is data: it is validated, never executed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from .alignment import prefix_units
from .errors import DataError, validation_summary
from .files import read_json_object, write_text_atomic
from .options import Target

RECORD_FILE = "pruned.json"
SCHEMA = "cswap.pruned/1"


@dataclass
class PrunedRecord:
    steps: int  # leading steps of the plan replayed
    target: Target
    widths: dict[str, int] | None = None  # every prunable layer's width after the replay
    model: dict | None = None  # how to build the unpruned architecture (a config's model section), if known

    @classmethod
    def of(cls, plan, steps: int, target: Target, model_recipe: dict | None = None) -> "PrunedRecord":
        """The record of `plan` replayed for `steps` steps to `target`."""
        return cls(steps, target, widths_after(plan, steps, target), model_recipe)

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "steps_applied": self.steps, "target": self.target.model_dump(mode="json"),
                "widths": self.widths, "model": self.model}

    def save(self, folder: str | Path) -> Path:
        return write_text_atomic(Path(folder) / RECORD_FILE, json.dumps(self.to_json(), indent=1) + "\n")


def widths_after(plan, steps: int, target: Target) -> dict[str, int]:
    """Every prunable layer's width after replaying `steps` steps to `target`."""
    widths = {name: int(width) for name, width in plan.layers.items()}
    for unit in prefix_units(plan.steps, plan.layers, steps, target.round_to):
        widths[unit.layer] -= 1
    return widths


def read_record(folder: str | Path, steps_in_plan: int) -> PrunedRecord:
    """The record of the pruned model in `folder`, checked against a plan of `steps_in_plan`
    steps: `pruned.json`, or for a run directory written before it existed, `report.json`'s
    `steps_applied` and `round_to`."""
    folder = Path(folder)
    path = folder / RECORD_FILE
    if path.is_file():
        data = read_json_object(path)
        if data.get("schema") not in (SCHEMA, None):
            raise DataError(f"{path}: not a pruned-model record (schema {data.get('schema')!r}, expected {SCHEMA!r})")
        target_data = data.get("target") or {}
    elif (folder / "report.json").is_file():
        path = folder / "report.json"
        data = read_json_object(path)
        target_data = {"round_to": data.get("round_to")}
    else:
        raise DataError(f"{folder} holds no pruned-model record ({RECORD_FILE})")
    steps = data.get("steps_applied")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= steps_in_plan:
        raise DataError(f"{path}: steps_applied {steps!r} is not a step count of the plan (0..{steps_in_plan})")
    try:
        target = Target.model_validate(target_data)
    except ValidationError as exc:
        raise DataError(f"{path}: its target is not valid: {validation_summary(exc)}") from None
    widths, model = data.get("widths"), data.get("model")
    if widths is not None and not (isinstance(widths, dict) and all(isinstance(v, int) for v in widths.values())):
        raise DataError(f"{path}: widths must map layer names to integers")
    if model is not None and not isinstance(model, dict):
        raise DataError(f"{path}: model must be a mapping (a config's model section)")
    return PrunedRecord(steps, target, widths, model)

