"""Run configuration: pydantic models read from YAML, with `--set a.b=c` overrides.

Every model forbids unknown fields, so a typo is an error naming the field, and plugin names
are checked against the entry points, so a config can only name registered plugins. The
`pruning:` section is `cswap.options.PruningOptions`, declared there once.

Relative paths in a config file are read against the folder of that file, so a config and
its data travel together: `model.weights` and every option a plugin declares as a path
(a `Path` field of its `Options`, e.g. a task's `root`). Paths given with `--set` are read
against the current folder, as on any command line; `output.dir` too.
"""
from __future__ import annotations

import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import registry
from .errors import ConfigError, validation_summary
from .backends import BACKENDS, DEFAULT_ROUND_TO
from .options import PRESETS, TARGET_KINDS, PruningOptions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Strict):
    source: Literal["cswap", "torchvision", "timm"] = Field(
        "cswap", description="cswap: a builder registered under cswap.models; or torchvision / timm by name")
    name: str
    kwargs: dict[str, Any] = {}
    weights: Path | None = Field(None, description="local state-dict checkpoint")
    allow_pickle: bool = Field(False, description="allow full-pickle checkpoints (runs code from the file)")


class PluginRef(_Strict):
    name: str
    options: dict[str, Any] = {}


class OutputConfig(_Strict):
    dir: Path = Field(Path("runs"), description="run directories are created under this folder")
    latency_repeats: int = Field(20, ge=1)
    report_batch: int = Field(32, ge=1, description="the report times both models at batch 1 and at this batch size")
    latency_backend: Literal[BACKENDS] = Field(
        "torch", description="the runtime latency is measured in, for the report, the latency table and a latency "
        "target (cswap/backends.py): torch (eager), torch_channels_last, onnxruntime (the file cswap export writes)")
    checkpoint_seconds: float = Field(2.0, ge=0, description="save the analysis state at most this often")


SEED_MAX = 2**32 - 1  # what every generator we seed accepts (numpy's legacy one is the narrowest)
_DEVICE = re.compile(r"(cpu|cuda|mps)(:\d+)?")


class RunConfig(_Strict):
    name: str = Field("run", description="names the default run directory: a plain file name")
    seed: int = Field(0, ge=0, le=SEED_MAX, strict=True, description="seeds S, unit orders and replays")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or mps (checked against this machine when run)")
    threads: int | None = Field(None, ge=1, le=1024, description="torch intra-op threads (default: torch's choice)")
    model: ModelConfig
    task: PluginRef
    adapter: PluginRef = PluginRef(name="auto")
    scorer: PluginRef | None = None  # default: the task's
    test: PluginRef | None = None  # default: the task's
    pruning: PruningOptions = PruningOptions()
    output: OutputConfig = OutputConfig()

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or v.startswith(".") or any(c in v for c in "/\\") or not v.isprintable():
            raise ValueError(f"{v!r} is not a plain file name (it names the run directory): no '/', no leading '.'")
        return v

    @field_validator("device")
    @classmethod
    def _device_named(cls, v: str) -> str:
        if not _DEVICE.fullmatch(v):
            raise ValueError(f"{v!r} is not a device: cpu, cuda, cuda:N or mps")
        return v

    @field_validator("task")
    @classmethod
    def _task_registered(cls, v: PluginRef) -> PluginRef:
        return _registered("tasks", v)

    @field_validator("adapter")
    @classmethod
    def _adapter_registered(cls, v: PluginRef) -> PluginRef:
        return v if v.name == "auto" else _registered("adapters", v)

    @field_validator("scorer")
    @classmethod
    def _scorer_registered(cls, v: PluginRef | None) -> PluginRef | None:
        return v if v is None else _registered("scorers", v)

    @field_validator("test")
    @classmethod
    def _test_registered(cls, v: PluginRef | None) -> PluginRef | None:
        return v if v is None else _registered("tests", v)

    @model_validator(mode="after")
    def _widths_for_backend(self):
        """A target that names no `round_to` gets the alignment its latency backend runs fastest at
        (`backends.DEFAULT_ROUND_TO`); written into the saved config, so a resume reads the same."""
        if "round_to" not in self.pruning.model_fields_set and DEFAULT_ROUND_TO[self.output.latency_backend]:
            self.pruning = self.pruning.model_copy(update={"round_to": DEFAULT_ROUND_TO[self.output.latency_backend]})
        return self

    @model_validator(mode="after")
    def _model_registered(self):
        if self.model.source == "cswap" and self.model.name not in registry.available("models"):
            raise ValueError(
                f"unknown model {self.model.name!r}; registered: {', '.join(registry.available('models'))}"
            )
        return self


def _registered_name(kind: str, name) -> bool:
    """Whether `name` (any value a config holds, checked before validation) names a plugin."""
    return isinstance(name, str) and name in registry.available(kind)


def _registered(kind: str, ref: PluginRef) -> PluginRef:
    names = registry.available(kind)
    if ref.name not in names:
        raise ValueError(f"unknown {kind[:-1]} {ref.name!r}; available: {', '.join(names) or '(none)'}")
    return ref


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides; the value is parsed as YAML (`0.1`, `true`, `[1, 2]`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form a.b=c")
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None
    return data


def parse_config(data: dict) -> RunConfig:
    try:
        return RunConfig(**data)
    except ValidationError as exc:
        raise ConfigError("invalid configuration: " + validation_summary(exc)) from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def load_config_text(text: str, source: str | Path) -> dict:
    """The YAML mapping in `text`; malformed YAML is one line naming the file and position."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def preset_overrides(name: str, data: dict) -> list[str]:
    """`--preset NAME` as `--set` items for the config `data`: every pruning option, and a test
    option only where the config's test (the task's default test when it names none) has it."""
    test = _test_of(data)
    schema = getattr(registry.load("tests", test), "Options", None) if _registered_name("tests", test) else None
    declared = schema.model_fields if schema is not None else {}
    items = []
    for key, value in PRESETS[name].items():
        if key.startswith("test.options."):
            if key.split(".", 2)[2] not in declared:
                continue  # this config's test has no such option: the preset leaves it as it is
            if not data.get("test"):
                items.append(f"test.name={test}")
        items.append(f"{key}={value}")
    return items


def _test_of(data: dict) -> str | None:
    """The name of the test a config runs: its own, or its task's default."""
    test, task = data.get("test"), data.get("task")
    if isinstance(test, dict) and test.get("name"):
        return test["name"]
    name = task.get("name") if isinstance(task, dict) else None
    return registry.load("tasks", name).default_test if _registered_name("tasks", name) else None


def load_config(path: str | Path, overrides: list[str] = (), preset: str | None = None) -> RunConfig:
    """The config at `path`, with a named preset's settings and then `overrides` (which win)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    data = resolve_relative_paths(load_config_text(text, path), path.resolve().parent)
    items = (preset_overrides(preset, data) if preset else []) + list(overrides)
    return parse_config(apply_overrides(replace_target(data, overrides), items))


def replace_target(data: dict, overrides) -> dict:
    """`data` without the file's own target when an override names another kind of target:
    `cswap prune demo --set pruning.max_drop=1` asks for a quality target instead of the demo's
    parameter share, not for both (which `Target` refuses)."""
    named = {key.partition("=")[0].split(".", 1)[1] for key in overrides if key.startswith("pruning.")}
    kinds = {kind for kind, fields in TARGET_KINDS.items() if named & set(fields)}
    section = data.get("pruning")
    if kinds and isinstance(section, dict):
        for kind, fields in TARGET_KINDS.items():
            if kind not in kinds:
                for name in fields:
                    section.pop(name, None)
    return data


def check_device_available(device: str) -> None:
    """Refuse a device this machine does not have, before anything is built. Called where a
    config is about to run on its device (`cswap curve`; the analysis when it moves the model
    to the device), never where a config is only read: a GPU config still validates and
    dry-runs on a laptop, and a run directory made on a GPU reloads on a CPU."""
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count <= int(index or 0):
            seen = "no GPU" if count == 0 else f"{count} GPU(s), cuda:0 to cuda:{count - 1}"
            raise ConfigError(f"device {device!r} is not available here: torch sees {seen}; use --set device=cpu")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} is not available here (no Apple GPU); use --set device=cpu")


_PLUGIN_SECTIONS = {"task": "tasks", "scorer": "scorers", "test": "tests", "adapter": "adapters"}


def resolve_relative_paths(data: dict, base: Path) -> dict:
    """`data` (a config file's mapping) with its relative paths made absolute against `base`:
    `model.weights` and the options each named plugin declares as `Path` fields."""
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("weights"), str):
        model["weights"] = _against(base, model["weights"])
    for section, kind in _PLUGIN_SECTIONS.items():
        ref = data.get(section)
        if not (isinstance(ref, dict) and isinstance(ref.get("options"), dict)
                and _registered_name(kind, ref.get("name"))):
            continue
        schema = registry.load(kind, ref["name"]).Options
        for name, info in (schema.model_fields.items() if schema is not None else ()):
            value = ref["options"].get(name)
            if isinstance(value, str) and _declares_path(info.annotation):
                ref["options"][name] = _against(base, value)
    return data


def _declares_path(annotation) -> bool:
    return annotation is Path or Path in typing.get_args(annotation)


def _against(base: Path, value: str) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else Path(os.path.normpath(base / path)))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
