"""A pruned model leaves C-SWAP: saved and reloaded from the Python API as the CLI does,
exported for deployment (ONNX, torch.export), and in a model family's own format.

Why here and not in `run`: the same files serve both doors. `cswap prune` writes a run
directory (`config.yaml`, `plan.json`, `pruned_model.pt`, `report.json`); an API user has no
config, so `save_pruned` writes `plan.json`, `pruned_model.pt` and `pruned.json` (the steps
applied), and `load_pruned(folder, model=fresh_unpruned_model)` rebuilds the shape by
replaying the plan on that model and loads the weights (`weights_only`). A model class may
define `save_native(folder)` (mmseg's `SegLogits` writes an mmseg checkpoint); `cswap prune`
and `save_pruned` call it, so the folder also holds what that family's own tools read.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import DataError, ModelError
from .files import load_checkpoint, save_state_dict_atomic, write_native, write_text_atomic
from .plan import PruningPlan

PRUNED_INFO = "pruned.json"


def save_pruned(folder: str | Path, model: nn.Module, plan: PruningPlan, *, params_ratio: float | None = None,
                flops_ratio: float | None = None, adapter=None, pruned: nn.Module | None = None) -> nn.Module:
    """Prune `model` (unpruned; not changed) by `plan` to the target, as `plan.apply` does,
    and save what `load_pruned(folder, model=...)` needs; returns the pruned model. `pruned`
    saves that model's weights instead (e.g. after fine-tuning or recovery): its shapes must be
    the replay's."""
    folder = Path(folder)
    k = plan.prefix(model, params_ratio, flops_ratio)
    replayed = plan.apply_prefix(model, k, adapter=adapter)
    result = replayed if pruned is None else pruned
    mine, theirs = replayed.state_dict(), result.state_dict()
    wrong = [key for key in mine if key not in theirs or theirs[key].shape != mine[key].shape]
    if wrong or set(theirs) - set(mine):
        raise ModelError(f"the model given as pruned is not the plan's replay at {k} steps (e.g. {wrong[:3]})")
    plan.save(folder / "plan.json")
    save_state_dict_atomic(result.state_dict(), folder / "pruned_model.pt")
    write_text_atomic(folder / PRUNED_INFO, json.dumps({"steps_applied": k, "adapter": plan.adapter}, indent=1) + "\n")
    write_native(result, folder)
    return result


def load_pruned(folder: str | Path, model: nn.Module | None = None) -> nn.Module:
    """A pruned model from a run directory (`cswap prune`; architecture from its config) or
    from a `save_pruned` folder, whose architecture is `model`: a freshly built, unpruned
    instance (its weights do not matter; it is pruned in place and returned)."""
    folder = Path(folder)
    if model is None:
        if not (folder / "config.yaml").is_file():
            raise DataError(f"{folder} has no config.yaml (not a run directory): pass model=, an unpruned instance "
                            "of the architecture, to load a folder written by save_pruned")
        from .run import load_pruned as load_run

        return load_run(folder)
    from .run import _read_json, _read_plan

    for name in ("plan.json", "pruned_model.pt"):
        if not (folder / name).is_file():
            raise DataError(f"{folder} holds no pruned model: {name} is missing")
    plan = _read_plan(folder / "plan.json")
    info = _read_json(folder / PRUNED_INFO) if (folder / PRUNED_INFO).is_file() else _read_json(folder / "report.json")
    steps = info.get("steps_applied")
    if not isinstance(steps, int) or not 0 <= steps <= len(plan.steps):
        raise DataError(f"{folder}: steps_applied {steps!r} is not a step count of the plan (0..{len(plan.steps)})")
    from .build import load_weights

    pruned = plan.apply_prefix(model.eval(), steps, inplace=True)
    load_weights(pruned, load_checkpoint(folder / "pruned_model.pt"), str(folder / "pruned_model.pt"))
    return pruned.eval()


def export_run(folder: str | Path, fmt: str, out: str | Path | None = None) -> tuple[Path, str]:
    """`cswap export`: the folder's pruned model as ONNX (`pruned_model.onnx`) or a
    torch.export program (`pruned_model.pt2`), traced on a zero input of the plan's input
    shape; returns the file and how its outputs compare with the PyTorch model's."""
    folder = Path(folder)
    model = load_pruned(folder)
    plan = PruningPlan.load(folder / "plan.json")
    x = plan.example_inputs()  # one input of the analysed shape
    path = Path(out) if out else folder / ("pruned_model.onnx" if fmt == "onnx" else "pruned_model.pt2")
    with torch.no_grad():
        expected = model(x)
    if fmt == "onnx":
        return path, _onnx(model, x, path, expected)
    if fmt == "torch_export":
        program = torch.export.export(model, (x,))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(path))
        with torch.no_grad():
            got = torch.export.load(str(path)).module()(x)
        return path, f"reloaded: max |difference| {float((got - expected).abs().max()):.3g}"
    raise DataError(f"unknown export format {fmt!r}: onnx or torch_export")


def _onnx(model: nn.Module, x: torch.Tensor, path: Path, expected: torch.Tensor) -> str:
    """torch's ONNX exporter (needs `onnx` and `onnxscript`: the `export` extra), checked
    with onnxruntime when it is installed."""
    import importlib.util
    import warnings

    for module in ("onnx", "onnxscript"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["output"],
                          dynamo=True, external_data=False, verbose=False)
    if importlib.util.find_spec("onnxruntime") is None:
        return "not run: onnxruntime is not installed"
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    return f"onnxruntime: max |difference| {float((got - expected).abs().max()):.3g}"
