"""A model written as an ONNX file that takes the shapes it will be deployed at.

Why a module of its own: `cswap export` writes the file users ship, and the onnxruntime
latency backend (`cswap.backends`) times the very same graph, so both go through here.

Which axes are dynamic is found, not assumed. The batch axis and the spatial axes are asked
for (torch.export's `Dim.AUTO`: the exporter keeps an axis dynamic unless the model fixes
it); the file is then run in onnxruntime at two shapes other than the traced one and its
outputs compared with PyTorch's. A model that fixes its input size where tracing cannot see
it (a ViT's position embeddings, a detector's anchors computed for one image size) gives
different outputs or fails there, so that axis set is dropped: first the spatial axes, then
the batch axis, and the note says what the file takes.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError, one_line

log = logging.getLogger("cswap")

#: largest |onnxruntime - PyTorch| accepted, relative to the largest |output| of PyTorch; float32
#: round-off of a reordered sum is ~1e-6 of it, a wrongly generalised shape is of its order
RELATIVE_TOLERANCE = 1e-4
SPATIAL_NAMES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


@dataclass
class OnnxFile:
    """What was written: the file, the input axes it takes at any size, and the check."""

    path: Path
    traced_shape: tuple[int, ...]  # the input the file was traced on (and checked at)
    dynamic_axes: dict[int, str]  # input axis -> name ({} : every axis fixed)
    checked_shapes: list[tuple[int, ...]] = field(default_factory=list)  # run in onnxruntime beside PyTorch
    relative_difference: float | None = None  # largest over the checked shapes (and the traced one)
    dropped: list[str] = field(default_factory=list)  # why a larger axis set was not kept

    @property
    def note(self) -> str:
        """One line for the user: what the file takes and how it compared with PyTorch."""
        takes = ("any " + ", ".join(self.dynamic_axes.values())) if self.dynamic_axes else "a fixed input shape"
        shapes = ", ".join("x".join(map(str, s)) for s in self.checked_shapes)
        where = shapes or "the traced shape " + "x".join(map(str, self.traced_shape))
        checked = (f"onnxruntime == PyTorch at {where} (max |difference| {self.relative_difference:.2g} of the "
                   f"output scale)")
        return f"takes {takes}; {checked}" + (f"; {'; '.join(self.dropped)}" if self.dropped else "")


def require_onnx() -> None:
    """torch's ONNX exporter needs `onnx` and `onnxscript`, the check `onnxruntime` (the
    `export` extra); a missing one is a ModuleNotFoundError the CLI turns into the install hint."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def write_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, opset: int | None = None,
               dynamic: bool = True, metadata: dict[str, str] | None = None, threads: int | None = None) -> OnnxFile:
    """`model` (eval mode, on the CPU) as ONNX at `path`, traced on `example` (one input
    batch), with the largest set of dynamic axes that onnxruntime runs correctly (module
    docstring; `dynamic=False`: fixed at `example`'s shape), checked against PyTorch, with
    `metadata` in the file's `metadata_props`."""
    require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    dropped: list[str] = []
    candidates = candidate_axes(example, dynamic)
    for i, axes in enumerate(candidates):
        shapes = check_shapes(example, axes)
        problem = _pytorch_refuses(model, example, shapes)
        if problem is None:
            problem = _export(model, example, path, axes, opset)
        if problem is None:
            difference, problem = _compare(model, path, [tuple(example.shape), *shapes], threads)
        if problem is None:
            result = OnnxFile(path, tuple(example.shape), {a: axis_name(a, example.dim()) for a in axes}, shapes,
                              difference, dropped)
            set_metadata(path, metadata or {})
            return result
        lost = [a for a in axes if i + 1 == len(candidates) or a not in candidates[i + 1]]
        dropped.append(f"{', '.join(axis_name(a, example.dim()) for a in lost) or 'shape'} fixed: {problem}")
        log.info("ONNX export: %s", dropped[-1])
    raise ModelError(f"the model cannot be exported to ONNX: {dropped[-1]}")


def axis_name(axis: int, ndim: int) -> str:
    """"batch", "channels", or a spatial axis's name ("height", "width"; "length" of a signal)."""
    if axis < 2:
        return ("batch", "channels")[axis]
    names = SPATIAL_NAMES.get(ndim - 2)
    return names[axis - 2] if names else f"axis{axis}"


def candidate_axes(example: torch.Tensor, dynamic: bool) -> list[tuple[int, ...]]:
    """Axis sets to try, largest first: batch and spatial axes, batch alone, none."""
    if not dynamic:
        return [()]
    spatial = tuple(range(2, example.dim()))
    return ([(0, *spatial)] if spatial else []) + [(0,), ()]


def check_shapes(example: torch.Tensor, axes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Two input shapes other than the traced one along `axes` (none when no axis is dynamic):
    batch 2 and 3, and each spatial axis at twice its size in one of them. Multiples keep any
    divisibility the model needs (a stride of 32 at the analysed size still divides)."""
    if not axes:
        return []
    shapes = []
    for batch, doubled in ((2, 0), (3, 1)):
        shape = list(example.shape)
        if 0 in axes:
            shape[0] = batch
        spatial = [a for a in axes if a >= 2]
        for i, a in enumerate(spatial):
            if i % 2 == doubled or len(spatial) == 1:
                shape[a] *= 2
        shapes.append(tuple(shape))
    return shapes


def _input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A seeded standard-normal input of `shape` (the check needs inputs that exercise every
    channel, not the zeros the file is traced on)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _outputs(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [t for v in result.values() for t in _outputs(v)]
    if isinstance(result, (tuple, list)):
        return [t for v in result for t in _outputs(v)]
    return []


@torch.no_grad()
def _pytorch_refuses(model: nn.Module, example: torch.Tensor, shapes) -> str | None:
    """Why PyTorch itself cannot run the model at `shapes`, or None: no file can do better."""
    for i, shape in enumerate(shapes):
        try:
            model(_input(shape, i))
        except Exception as exc:  # the model's own check of its input size, a shape mismatch
            return f"PyTorch refuses input {'x'.join(map(str, shape))} ({type(exc).__name__}: {one_line(exc, 120)})"
    return None


def _export(model: nn.Module, example: torch.Tensor, path: Path, axes: tuple[int, ...],
            opset: int | None) -> str | None:
    """torch's dynamo ONNX exporter with `Dim.AUTO` on `axes`; the reason it failed, or None."""
    from torch.export import Dim

    trace = example.expand(2, *example.shape[1:]).contiguous() if 0 in axes and example.shape[0] == 1 else example
    dynamic_shapes = ({a: Dim.AUTO for a in axes},) if axes else None  # 0/1 sizes specialise: batch 2
    extra = {"opset_version": opset} if opset is not None else {}
    try:
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (trace,), str(path), input_names=["input"], dynamic_shapes=dynamic_shapes,
                              dynamo=True, external_data=False, verbose=False, **extra)
    except Exception as exc:  # torch.export or the ONNX translation cannot handle this model
        return f"the exporter failed ({type(exc).__name__}: {one_line(exc, 160)})"
    return None


class _quiet_exporter:
    """torch.export logs a line per specialised dimension at WARNING: not the user's concern."""

    def __enter__(self):
        self._loggers = [logging.getLogger(n) for n in ("torch._export", "torch.export", "torch.onnx",
                                                        "torch._dynamo", "torch.fx.experimental.symbolic_shapes")]
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc) -> None:
        for lg, level in zip(self._loggers, self._levels):
            lg.setLevel(level)


def session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session with `threads` intra-op threads (default: torch's count), one
    inter-op thread and sequential execution, so its timings compare with PyTorch's."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def _compare(model: nn.Module, path: Path, shapes, threads: int | None) -> tuple[float, str | None]:
    """The largest relative |onnxruntime - PyTorch| over `shapes`, and why it is refused (None: accepted)."""
    try:
        runner = session(path, threads)
    except Exception as exc:  # onnxruntime cannot load what the exporter wrote
        return float("nan"), f"onnxruntime cannot load the file ({type(exc).__name__}: {one_line(exc, 120)})"
    name, worst = runner.get_inputs()[0].name, 0.0
    for i, shape in enumerate(shapes):
        x = _input(shape, 100 + i)
        try:
            got = runner.run(None, {name: x.numpy()})
        except Exception as exc:  # the graph fixed a size the input does not have
            return float("nan"), f"onnxruntime fails at {'x'.join(map(str, shape))} ({one_line(exc, 120)})"
        expected = _outputs(model(x))
        if len(got) != len(expected) or any(tuple(g.shape) != tuple(e.shape) for g, e in zip(got, expected)):
            return float("nan"), f"onnxruntime gives other output shapes at {'x'.join(map(str, shape))}"
        for g, e in zip(got, expected):
            scale = float(e.abs().max()) if e.numel() else 0.0
            diff = float((torch.from_numpy(g) - e).abs().max()) if e.numel() else 0.0
            relative = diff / scale if scale > 0 else diff
            worst = max(worst, relative)
            if not relative <= RELATIVE_TOLERANCE:
                return relative, (f"onnxruntime differs from PyTorch at {'x'.join(map(str, shape))} by {relative:.2g} "
                                  "of the output scale")
    return worst, None


def set_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Write `metadata` into the file's `metadata_props` (string keys and values)."""
    if not metadata:
        return
    import onnx

    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
    onnx.save(proto, str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The file's `metadata_props` as a dict (what `cswap export` recorded)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
