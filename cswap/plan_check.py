"""The values of a `plan.json`, checked before a plan is built from them.

Why: a plan file may be hand-edited, truncated or received from someone else, and a value of
the wrong kind (a width `"abc"`, a negative input shape, a channel past its layer) used to
surface as a raw traceback deep inside a replay. `check_plan_data` reads the mapping that
`json.loads` gave and raises one `DataError` naming the file, the field and the value; it
runs nothing and needs no model. `PruningPlan.from_json` calls it first (the file is the
plan module's; this check is here so the plan stays data only).
"""
from __future__ import annotations

from .errors import DataError

SCHEMA = "cswap.plan/1"  # the plan file's format (written by `PruningPlan.to_json`)


def _is_int(x, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _optional(check):
    return lambda x: x is None or check(x)


def _text_map(x) -> bool:
    return isinstance(x, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in x.items())


_FIELDS = {  # field -> (check, what it must be); fields absent from a file are left to the plan's defaults
    "method": (lambda x: isinstance(x, str), "a name"),
    "adapter": (lambda x: isinstance(x, str), "a name"),
    "input_shape": (lambda x: isinstance(x, list) and 1 <= len(x) <= 6 and all(_is_int(d, 1) for d in x),
                    "a list of positive sizes"),
    "params_total": (lambda x: _is_int(x, 1), "a positive count"),
    "layers": (lambda x: isinstance(x, dict) and all(isinstance(k, str) and _is_int(v, 1) for k, v in x.items()),
               "a mapping of layer names to positive widths"),
    "steps": (lambda x: isinstance(x, list) and all(isinstance(s, dict) for s in x), "a list of steps"),
    "protected": (_text_map, "a mapping of units to reasons"),
    "skipped_layers": (_text_map, "a mapping of layers to reasons"),
    "meta": (lambda x: isinstance(x, dict), "a mapping"),
    "seed": (_optional(_is_int), "a seed (0 or more) or null"),
    "samples_per_class": (_optional(lambda x: _is_int(x, 1)), "a positive count or null"),
    "intervention": (lambda x: isinstance(x, str), "a name"),
    "ridge": (_optional(lambda x: _is_number(x) and x >= 0), "a number (0 or more) or null"),
    "scorer": (_optional(lambda x: isinstance(x, dict)), "a mapping or null"),
    "test": (_optional(lambda x: isinstance(x, dict)), "a mapping or null"),
}
_REQUIRED = ("method", "adapter", "input_shape", "params_total", "layers", "steps")


def check_plan_data(data, source: str) -> None:
    """Refuse a plan mapping whose values cannot be a plan, naming `source` and the field."""
    if not isinstance(data, dict):
        raise DataError(f"{source} does not hold a JSON object")
    if data.get("schema") != SCHEMA:
        raise DataError(f"{source} is not a C-SWAP plan (schema {_short(data.get('schema'))}, expected {SCHEMA!r})")
    for name in _REQUIRED:
        if name not in data:
            raise DataError(f"{source}: field {name!r} is missing; was the file truncated or edited?")
    for name, (check, must) in _FIELDS.items():
        if name in data and not check(data[name]):
            raise DataError(f"{source}: {name} = {_short(data[name])} is not {must}")
    seen: set[str] = set()
    for i, step in enumerate(data["steps"]):
        unit = _check_step(step, data["layers"], f"{source}: steps[{i}]")
        if unit in seen:
            raise DataError(f"{source}: steps[{i}] removes {unit} a second time")
        seen.add(unit)


def _check_step(step: dict, layers: dict, where: str) -> str:
    """One step: a unit `layer:channel` of a listed layer, within its width; typed values."""
    unit = step.get("unit")
    layer, _, channel = unit.rpartition(":") if isinstance(unit, str) else ("", "", "")
    if layer not in layers or not channel.isdigit() or int(channel) >= layers[layer]:
        raise DataError(f"{where}: unit {_short(unit)} is not a channel of a layer of the plan (layer:channel, "
                        "channel below the layer's width)")
    if not isinstance(step.get("phase"), str) or not isinstance(step.get("category", ""), (str, type(None))):
        raise DataError(f"{where}: phase and category must be names")
    for name in ("xi", "score"):
        if step.get(name) is not None and not _is_number(step[name]):
            raise DataError(f"{where}: {name} = {_short(step[name])} is not a number")
    p_values = step.get("p_values", {})
    if not (isinstance(p_values, dict) and all(k.lstrip("-").isdigit() and _is_number(v) for k, v in p_values.items())):
        raise DataError(f"{where}: p_values must map group numbers to numbers")
    if not _is_int(step.get("params_freed", 0)):
        raise DataError(f"{where}: params_freed = {_short(step.get('params_freed'))} is not a count")
    return unit


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
