"""Turn a config into live objects: model, task, adapter, scorer, significance test.

All plugin classes are reached through `registry`; torchvision and timm models by name.
"""
from __future__ import annotations

import logging

from torch import nn

from . import registry
from .config import ModelConfig, PluginRef
from .errors import ConfigError, ModelError
from .files import load_checkpoint
from .interfaces import ArchitectureAdapter, SignificanceTest, ScoringFunction, Task

log = logging.getLogger("cswap")


def build_model(cfg: ModelConfig, *, random_if_missing: bool = False) -> tuple[nn.Module, str]:
    """The model with its weights, and a note saying where the weights came from."""
    try:
        if cfg.source == "cswap":
            model = registry.load("models", cfg.name)(**cfg.kwargs)
        elif cfg.source == "torchvision":
            import torchvision

            model = torchvision.models.get_model(cfg.name, weights=None, **cfg.kwargs)
        else:
            import timm

            model = timm.create_model(cfg.name, pretrained=False, **cfg.kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
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


def build_task(ref: PluginRef, **context) -> Task:
    return registry.create("tasks", ref.name, ref.options, **context)


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
        except ImportError as exc:  # e.g. a plugin whose optional dependency is not installed
            log.warning("adapter %s skipped by auto: %s", name, exc)
            continue
        candidates.append((adapter.priority, name, adapter))
    for _, name, adapter in sorted(candidates, key=lambda c: (-c[0], c[1])):
        if adapter.matches(model):
            log.info("adapter auto: %s", name)
            return name, adapter
    raise ConfigError(f"no adapter matches {type(model).__name__}; available: {[c[1] for c in candidates]}")
