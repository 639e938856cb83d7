"""A pruned model leaves C-SWAP: saved and reloaded from the Python API as the CLI does,
exported for deployment (ONNX, torch.export), and in a model family's own format.

Why here and not in `run`: the same files serve both doors. `cswap prune` writes a run
directory (`config.yaml`, `plan.json`, `pruned_model.pt`, `pruned.json`, `report.json`); an
API user has no config, so `save_pruned` writes `plan.json`, `pruned_model.pt` and
`pruned.json` (`cswap.pruned_record`: the steps applied and the whole target, `round_to` and
recovery included). `load_pruned` rebuilds the shape by replaying the plan's steps on an
unpruned instance (`cswap.replay.removed_model`) and loads the weights (`weights_only`): the
instance comes from the run's config, from the build recipe `save_pruned` was given, or from
the caller (`model=`). A model class may define `save_native(folder)` (mmseg's `SegLogits`
writes an mmseg checkpoint); `cswap prune` and `save_pruned` call it, so the folder also
holds what that family's own tools read.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .backends import DEFAULT_ROUND_TO
from .errors import ConfigError, DataError
from .files import load_checkpoint, read_json_object, read_user_text, save_state_dict_atomic, write_native
from .plan import PruningPlan
from .plan_check import check_plan_data
from .pruned_record import PrunedRecord, read_record, widths_after
from .replay import adapter_of, prune, removed_model, steps_matching, target_of


def save_pruned(folder: str | Path, model: nn.Module, plan: PruningPlan, target=None, *, data=None, adapter=None,
                pruned: nn.Module | None = None, builder: dict | None = None, **target_fields) -> nn.Module:
    """Prune `model` (unpruned; not changed) by `plan` to `target` (a `cswap.Target` or its
    fields as keywords) exactly as `plan.apply` does (`data`: what it repairs on), save what
    `load_pruned` needs, and return the pruned model. `pruned` saves that model instead (one
    `plan.apply` already made, or fine-tuned since): it is not replayed again, so a latency
    target is not measured twice; its shapes must be a replay's of `plan` to `target`.
    `builder` (a config's model section, e.g. `{"source": "torchvision", "name": "resnet18"}`)
    lets `load_pruned` and `cswap export` rebuild the architecture without `model=`."""
    folder = Path(folder)
    target = target_of(target, **target_fields)
    adapter = adapter_of(plan, adapter)
    if pruned is None:
        replayed = prune(plan, model, target, data, adapter=adapter)
        pruned, steps = replayed.model, replayed.steps
    else:
        steps = steps_matching(plan, model, target, pruned, adapter)
    plan.save(folder / "plan.json")
    save_state_dict_atomic(pruned.state_dict(), folder / "pruned_model.pt")
    PrunedRecord.of(plan, steps, target, builder).save(folder)
    write_native(pruned, folder)
    return pruned


def load_pruned(folder: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The pruned model in `folder` (a run directory, or a folder written by `save_pruned`),
    rebuilt in this process. The unpruned architecture is `model` when given (a freshly built
    instance; its weights do not matter, it is pruned in place and returned), else the run's
    config or the build recipe the folder records.

    A folder may come from elsewhere, so none of its files can make this run code: the config
    passes the same validation as `cswap prune` (registered plugins only, every mmseg `type`
    checked, never `allow_pickle`), the plan and the record are JSON checked against the
    model, and a malformed file is a `CSwapError` naming it."""
    folder = Path(folder)
    for name in ("plan.json", "pruned_model.pt"):
        if not (folder / name).is_file():
            raise DataError(f"{folder} holds no pruned model: {name} is missing")
    plan = read_plan(folder / "plan.json")
    record = read_record(folder, len(plan.steps))
    model, adapter = _architecture(folder, plan, record) if model is None else (model, adapter_of(plan))
    _check_plan_fits(plan, model.eval(), folder / "plan.json")
    _check_widths(plan, record, folder)
    pruned = removed_model(plan, model, record.steps, record.target, adapter, inplace=True)
    from .build import load_weights

    load_weights(pruned, load_checkpoint(folder / "pruned_model.pt"), str(folder / "pruned_model.pt"))
    return pruned.eval()


def _architecture(folder: Path, plan: PruningPlan, record: PrunedRecord) -> tuple[nn.Module, object]:
    """The unpruned architecture and its adapter: from the run's config.yaml, or from the
    record's build recipe (`save_pruned(builder=...)`), validated like a config."""
    from .build import build_model, resolve_adapter
    from .config import ModelConfig, PluginRef, load_config_text, parse_config

    if (folder / "config.yaml").is_file():
        cfg = parse_config(load_config_text(read_user_text(folder / "config.yaml"), folder / "config.yaml"))
        model_cfg, adapter_ref = cfg.model, cfg.adapter
    elif record.model is not None:
        try:
            model_cfg, adapter_ref = ModelConfig.model_validate(record.model), PluginRef(name=plan.adapter)
        except ValueError as exc:
            raise DataError(f"{folder / 'pruned.json'}: its model recipe is not valid: {exc}") from None
    else:
        raise DataError(f"{folder} records no architecture (no config.yaml, no model recipe in pruned.json): pass "
                        "model=, an unpruned instance of the architecture, or save it with save_pruned(builder=...)")
    model, _ = build_model(model_cfg.model_copy(update={"weights": None, "allow_pickle": False}))
    return model, resolve_adapter(adapter_ref, model)[1]


def read_plan(path: Path) -> PruningPlan:
    """plan.json, or a one-line `DataError` naming the file and what is wrong in it."""
    data = read_json_object(path)
    check_plan_data(data, str(path))
    try:
        return PruningPlan.from_json(data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path} is not a readable C-SWAP plan: {type(exc).__name__}: {exc}") from exc


def _check_plan_fits(plan: PruningPlan, model: nn.Module, path: Path) -> None:
    """The model is the plan's (its parameter count), every layer of the plan a module of it,
    every step a channel of its layer."""
    from .removal import count_params

    if count_params(model) != plan.params_total:
        raise DataError(f"{path} was made for a model with {plan.params_total} parameters; the architecture has "
                        f"{count_params(model)}")
    for name in plan.layers:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise DataError(f"{path}: layer {name!r} of the plan is not a module of {type(model).__name__}") from None
    for step in plan.steps:
        unit = step.unit
        if unit.layer not in plan.layers or not 0 <= unit.channel < int(plan.layers[unit.layer]):
            raise DataError(f"{path}: step {unit} is not a channel of a layer of the plan")


def _check_widths(plan: PruningPlan, record: PrunedRecord, folder: Path) -> None:
    """The recorded widths are those the plan's replay gives (a record cannot drift from its plan)."""
    if record.widths is None:
        return
    expected = widths_after(plan, record.steps, record.target)
    if expected != record.widths:
        wrong = next((name for name in expected if expected[name] != record.widths.get(name)),
                     next(iter(set(record.widths) - set(expected)), None))
        raise DataError(f"{folder / 'pruned.json'}: the plan's replay gives layer {wrong} {expected[wrong]} channels, "
                        f"the record says {record.widths.get(wrong)}")


def export_run(folder: str | Path, fmt: str, out: str | Path | None = None, *, opset: int | None = None,
               input_shape: tuple[int, ...] | None = None, dynamic: bool = True) -> tuple[Path, str]:
    """`cswap export`: the folder's pruned model (a run directory or a `save_pruned` folder)
    as ONNX (`pruned_model.onnx`: dynamic batch and spatial axes where the model allows, each
    checked in onnxruntime, the plan, target and widths in its metadata; `cswap.onnx_export`)
    or a torch.export program (`pruned_model.pt2`), traced on a zero input of `input_shape`
    (one input, default the plan's); returns the file and what was checked."""
    folder = Path(folder)
    model = load_pruned(folder)
    plan = read_plan(folder / "plan.json")
    x = torch.zeros((1, *_traced_shape(plan, input_shape)))
    path = Path(out) if out else folder / ("pruned_model.onnx" if fmt == "onnx" else "pruned_model.pt2")
    if fmt == "onnx":
        provenance = _provenance(folder, plan, x)
        note = _onnx(model, x, path, provenance, opset=opset, dynamic=dynamic)
        return path, note + _alignment_note(plan, json.loads(provenance["cswap.widths"]))
    if fmt == "torch_export":
        with torch.no_grad():
            expected = model(x)
        program = torch.export.export(model, (x,))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(path))
        with torch.no_grad():
            got = torch.export.load(str(path)).module()(x)
        return path, f"reloaded: max |difference| {float((got - expected).abs().max()):.3g}"
    raise DataError(f"unknown export format {fmt!r}: onnx or torch_export")


def _traced_shape(plan: PruningPlan, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """One input's shape without the batch axis: `input_shape` (with or without a leading
    batch of 1), checked against the plan's number of axes and channels, or the plan's."""
    if input_shape is None:
        return tuple(plan.input_shape)
    shape = tuple(input_shape)
    if len(shape) == len(plan.input_shape) + 1 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != len(plan.input_shape) or any(not isinstance(d, int) or d < 1 for d in shape):
        raise ConfigError(f"input shape {tuple(input_shape)} is not one input of {len(plan.input_shape)} positive "
                          f"sizes like the plan's {tuple(plan.input_shape)}")
    if shape[0] != plan.input_shape[0]:
        raise ConfigError(f"input shape {shape} has {shape[0]} channels; the model takes {plan.input_shape[0]}")
    return shape


def _provenance(folder: Path, plan: PruningPlan, x: torch.Tensor) -> dict[str, str]:
    """What the exported file records of its making (ONNX `metadata_props`, JSON values): the
    plan (method, steps applied), the target and every prunable layer's width."""
    record = read_record(folder, len(plan.steps))
    _check_widths(plan, record, folder)
    widths = record.widths or widths_after(plan, record.steps, record.target)  # older runs recorded none
    from . import __version__

    return {
        "cswap.plan": json.dumps({"method": plan.method, "adapter": plan.adapter, "steps_applied": record.steps,
                                  "steps": len(plan.steps), "params_total": plan.params_total,
                                  "intervention": plan.intervention, "analysed_input_shape": list(plan.input_shape)}),
        "cswap.target": json.dumps(record.target.model_dump(mode="json")),
        "cswap.widths": json.dumps({name: int(w) for name, w in widths.items()}),
        "cswap.traced_input_shape": json.dumps(list(x.shape)),
        "cswap.version": __version__,
    }


def _alignment_note(plan: PruningPlan, widths: dict[str, int]) -> str:
    """A warning for the ONNX note when pruned widths are not multiples of what onnxruntime's
    blocked kernels take (`backends.DEFAULT_ROUND_TO`): such a model can run slower there than
    the original (MobileNetV2 x0.58 at batch 32, docs/results/latency.md)."""
    k = DEFAULT_ROUND_TO["onnxruntime"]
    odd = {name: w for name, w in widths.items() if w < plan.layers.get(name, w) and w % k}
    if not odd:
        return ""
    name, width = next(iter(odd.items()))
    return (f"; WARNING: {len(odd)} pruned layers are not a multiple of {k} wide (e.g. {name}: {width}), which "
            f"onnxruntime can run slower than the original: replay with pruning.round_to: {k}")


def _onnx(model: nn.Module, x: torch.Tensor, path: Path, metadata: dict[str, str], *, opset: int | None,
          dynamic: bool) -> str:
    """The ONNX file (`cswap.onnx_export.write_onnx`: the `export` extra), and its note."""
    from .onnx_export import write_onnx

    written = write_onnx(model.cpu(), x, path, opset=opset, dynamic=dynamic, metadata=metadata)
    return written.note
