"""Turn a config into live objects: model, task, adapter, scorer, test, and the `Analysis`
that joins them.

All plugin classes are reached through `registry`; torchvision and timm models by name.
`units_of` is the one place where the core builds a model's units for a run: the adapter's,
or torch-pruning's dependency groups, each layer checked (`cswap.verify`) before any work.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from . import registry
from .config import ModelConfig, PluginRef, RunConfig, check_device_available
from .discovery import discover
from .estimate import shrunk_inputs
from .errors import ConfigError, ModelError
from .files import load_checkpoint
from .interfaces import Analysis, ArchitectureAdapter, ScoringFunction, SignificanceTest, Task, UnitGraph
from .pairing import paired_for
from .verify import verify_units

log = logging.getLogger("cswap")


# timm arguments that fetch or read weights and configs (from the Hugging Face Hub or a file)
_TIMM_LOADERS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


def check_offline(cfg: ModelConfig) -> None:
    """Refuse model names and arguments that would download or read anything but the
    configured `model.weights` (nothing is downloaded, README): timm's `hf-hub:` names and
    weight arguments, torchvision's `weights*` arguments."""
    if cfg.source == "timm":
        if ":" in cfg.name:
            raise ConfigError(
                f"model.name {cfg.name!r}: timm names with a source prefix ({cfg.name.split(':')[0]}:) load the "
                "model from the Hugging Face Hub or a folder; C-SWAP downloads nothing. Name a timm architecture "
                "(e.g. resnet18) and give its weights as a local file in model.weights")
        bad = sorted(set(cfg.kwargs) & set(_TIMM_LOADERS))
    elif cfg.source == "torchvision":
        bad = sorted(k for k in cfg.kwargs if k.startswith("weights") and cfg.kwargs[k] is not None)
    else:
        return
    if bad:
        raise ConfigError(f"model.kwargs {bad} would load weights through {cfg.source}; C-SWAP downloads nothing, "
                          "give a local state dict in model.weights instead")


def _torchvision_model(name: str, kwargs: dict) -> nn.Module:
    import inspect

    import torchvision

    builder = torchvision.models.get_model_builder(name)
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs = {"weights_backbone": None, **kwargs}  # detectors default to an ImageNet download
    return builder(weights=None, **kwargs)


def build_model(cfg: ModelConfig, *, random_if_missing: bool = False) -> tuple[nn.Module, str]:
    """The model with its weights, and a note saying where the weights came from."""
    check_offline(cfg)
    try:
        if cfg.source == "cswap":
            model = registry.load("models", cfg.name)(**cfg.kwargs)
        elif cfg.source == "torchvision":
            model = _torchvision_model(cfg.name, cfg.kwargs)
        else:
            import timm

            model = timm.create_model(cfg.name, pretrained=False, **cfg.kwargs)
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"cannot build {cfg.source} model {cfg.name!r} with {cfg.kwargs}: {exc}") from exc
    if cfg.weights is None:
        return model.eval(), "random initialisation (no weights given)"
    if not cfg.weights.is_file():
        if random_if_missing:
            return model.eval(), f"random initialisation: weight file {cfg.weights} is absent"
        raise ModelError(f"weight file {cfg.weights} does not exist (model.weights)")
    state = load_checkpoint(cfg.weights, allow_pickle=cfg.allow_pickle)
    load_weights(model, state, str(cfg.weights))
    return model.eval(), f"weights from {cfg.weights}"


def load_weights(model: nn.Module, state: dict, source: str) -> None:
    """load_state_dict with an error that names every missing, unexpected or misshapen key."""
    own = model.state_dict()
    shape_errors = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items() if k in own and hasattr(v, "shape") and v.shape != own[k].shape
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if shape_errors or missing or unexpected:
        parts = []
        if shape_errors:
            parts.append("shape mismatch: " + "; ".join(shape_errors[:10]))
        if missing:
            parts.append(f"missing keys: {missing[:10]}")
        if unexpected:
            parts.append(f"unexpected keys: {unexpected[:10]}")
        raise ModelError(f"checkpoint {source} does not match the model: " + " | ".join(parts))
    model.load_state_dict(state)


def build_task(ref: PluginRef) -> Task:
    return registry.create("tasks", ref.name, ref.options)


def build_scorer(ref: PluginRef | None, task: Task) -> ScoringFunction:
    ref = ref or PluginRef(name=task.default_scorer)
    return registry.create("scorers", ref.name, ref.options)


def build_test(ref: PluginRef | None, task: Task) -> SignificanceTest:
    ref = ref or PluginRef(name=task.default_test)
    return registry.create("tests", ref.name, ref.options)


def resolve_adapter(ref: PluginRef | str, model: nn.Module) -> tuple[str, ArchitectureAdapter]:
    """The named adapter, or for `auto` the highest-priority adapter that matches the model."""
    ref = PluginRef(name=ref) if isinstance(ref, str) else ref
    if ref.name != "auto":
        return ref.name, registry.create("adapters", ref.name, ref.options)
    candidates = []
    for name in registry.available("adapters"):
        try:
            adapter = registry.create("adapters", name, ref.options if ref.options else None)
        except (ImportError, registry.PluginLoadError) as exc:  # e.g. an optional dependency is not installed
            log.warning("adapter %s skipped by auto: %s", name, exc)
            continue
        candidates.append((adapter.priority, name, adapter))
    for _, name, adapter in sorted(candidates, key=lambda c: (-c[0], c[1])):
        if adapter.matches(model):
            log.info("adapter auto: %s", name)
            return name, adapter
    raise ConfigError(f"no adapter matches {type(model).__name__}; available: {[c[1] for c in candidates]}")


def units_of(adapter: ArchitectureAdapter, model: nn.Module, example_inputs: torch.Tensor,
             verify: bool = True) -> UnitGraph:
    """The model's units: the adapter's own, or torch-pruning's dependency groups without
    the adapter's `ignored_layers`; with `verify`, every layer whose cut is not its physical
    removal is moved to `skipped` with the reason before anything runs."""
    check_layout(model, example_inputs)
    graph = adapter.units(model, example_inputs)
    if graph is None:
        graph = discover(model, example_inputs, ignored_layers=adapter.ignored_layers(model))
    return verify_units(model, graph, adapter, example_inputs) if verify else graph


def check_layout(model: nn.Module, example_inputs: torch.Tensor) -> None:
    """Refuse channels-last images (N, H, W, C) for a model whose first convolution reads
    channels on dim 1: tracing them fails far from the cause ("could not trace the model")."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    x = example_inputs
    if first is None or not torch.is_tensor(x) or x.dim() != 4:
        return
    channels = first.in_channels
    if x.shape[1] != channels and x.shape[-1] == channels <= 4:
        raise ModelError(f"the inputs have shape {tuple(x.shape)}, channels last (N, H, W, C), but the model's first "
                         f"convolution reads {channels} channels on dim 1: give images as (N, C, H, W), "
                         "e.g. x.permute(0, 3, 1, 2)")


def warn_random_weights(cfg: ModelConfig, note: str) -> None:
    """A model without trained weights gives a meaningless analysis: say so on the console."""
    if note.startswith("random initialisation"):
        msg = (f"model {cfg.source}:{cfg.name} has random weights ({note}); the analysis of an untrained model "
               "is meaningless: give its checkpoint in model.weights")
        log.warning(msg)


@dataclass
class Parts:
    """What a config builds before the units: the plugins, the model (eval mode, on the CPU)
    with where its weights came from, and an example input. A run checks its data on these
    (S drawn, every class covered) before the units are traced and verified, the slow part."""

    task: Task
    scorer: ScoringFunction
    test: SignificanceTest
    model: nn.Module
    note: str
    adapter_name: str
    adapter: ArchitectureAdapter
    example_inputs: torch.Tensor


def parts_from_config(cfg: RunConfig, *, random_if_missing: bool = False, on_device: bool = True) -> Parts:
    """The parts a config describes. Options of every plugin are validated first (before the
    model and the data are read), and whether the test can judge the scorer; the device is
    checked only when the run will use it (`--dry-run` needs none)."""
    torch.manual_seed(cfg.seed)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if on_device:
        check_device_available(cfg.device)  # a GPU config still validates and dry-runs on a CPU
    task = build_task(cfg.task)
    scorer, test = build_scorer(cfg.scorer, task), build_test(cfg.test, task)
    paired_for(test, scorer, (cfg.test.name if cfg.test else task.default_test),
               (cfg.scorer.name if cfg.scorer else task.default_scorer))  # before the model and units are built
    model, note = build_model(cfg.model, random_if_missing=random_if_missing)
    log.info("model %s:%s, %s", cfg.model.source, cfg.model.name, note)
    warn_random_weights(cfg.model, note)
    adapter_name, adapter = resolve_adapter(cfg.adapter, model)
    task.bind_model(model)
    return Parts(task, scorer, test, model, note, adapter_name, adapter, task.example_inputs())


def analysis_from_parts(parts: Parts, cfg: RunConfig, *, progress: bool = False, on_device: bool = True,
                        probe_side: int | None = None) -> Analysis:
    """The analysis of `parts`: the units built and checked, the model on `cfg.device` unless
    `on_device` is off. `probe_side` traces and checks the units on the example input shrunk
    to that many pixels a side where the model takes it (`--dry-run`: the units of a CNN do
    not depend on the image size; `cswap.estimate.shrunk_inputs`)."""
    p, x = parts, parts.example_inputs
    traced = shrunk_inputs(p.model, x, probe_side) if probe_side is not None else x
    graph = units_of(p.adapter, p.model, traced, verify=cfg.pruning.verify_units)
    device = torch.device(cfg.device if on_device else "cpu")
    return Analysis(p.model.to(device).eval(), graph, p.task, p.scorer, p.test, p.adapter, p.adapter_name, device,
                    cfg.pruning.analysis, progress, x)


def analysis_from_config(cfg: RunConfig, *, progress: bool = False, random_if_missing: bool = False,
                         on_device: bool = True, probe_side: int | None = None) -> tuple[Analysis, str]:
    """The analysis a config describes (`parts_from_config`, then `analysis_from_parts`), and
    where the model's weights came from."""
    parts = parts_from_config(cfg, random_if_missing=random_if_missing, on_device=on_device)
    return analysis_from_parts(parts, cfg, progress=progress, on_device=on_device, probe_side=probe_side), parts.note


def analysis_for(model: nn.Module, task: Task, *, scorer: ScoringFunction | str | None = None,
                 test: SignificanceTest | str | None = None, adapter: ArchitectureAdapter | str = "auto",
                 options=None, device: str | torch.device = "cpu", progress: bool = False,
                 example_inputs: torch.Tensor | None = None) -> Analysis:
    """The analysis of live objects (the Python API's, tests', benchmarks'): plugins given as
    objects or registered names (default: the task's scorer and test, the adapter that
    matches), `options` an `AnalysisOptions` (default: the defaults); units built and, unless
    `options.verify_units` is off, checked."""
    from .options import AnalysisOptions

    options = options if options is not None else AnalysisOptions()
    if not isinstance(scorer, ScoringFunction):
        scorer = registry.create("scorers", scorer or task.default_scorer)
    if not isinstance(test, SignificanceTest):
        test = registry.create("tests", test or task.default_test)
    if isinstance(adapter, ArchitectureAdapter):
        adapter_name = adapter.name
    else:
        adapter_name, adapter = resolve_adapter(adapter, model)
    model.eval()
    task.bind_model(model)
    x = example_inputs if example_inputs is not None else task.example_inputs()
    x = x.to(next(model.parameters()).device)
    return Analysis(model, units_of(adapter, model, x, options.verify_units), task, scorer, test, adapter,
                    adapter_name, torch.device(device), options, progress, x)
