"""Plugin lookup through Python entry points.

The core never imports a plugin module by name: tasks, scorers, significance tests, adapters,
criteria and model builders are found through the entry-point groups below, so a package
installed beside ours (or a `*.dist-info` folder on `sys.path`) extends C-SWAP without any
change here, and a config can only name code that some installed distribution registered.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from .errors import ConfigError

GROUPS: dict[str, str] = {
    "tasks": "cswap.tasks",
    "scorers": "cswap.scorers",
    "tests": "cswap.tests",
    "adapters": "cswap.adapters",
    "criteria": "cswap.criteria",
    "models": "cswap.models",
}


class UnknownPluginError(ConfigError):
    """A config or call named a plugin that no installed distribution registers."""


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    value: str
    distribution: str


def _group(kind: str) -> str:
    if kind not in GROUPS:
        raise ValueError(f"unknown plugin kind {kind!r}; kinds: {', '.join(GROUPS)}")
    return GROUPS[kind]


def available(kind: str) -> dict[str, EntryPoint]:
    """Entry points of one kind, by name. A name registered twice keeps the first found."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=_group(kind)):
        found.setdefault(ep.name, ep)
    return dict(sorted(found.items()))


def load(kind: str, name: str):
    """The object registered as `name` in group `kind`; the error lists what is available."""
    eps = available(kind)
    if name not in eps:
        names = ", ".join(eps) or "(none installed)"
        raise UnknownPluginError(f"unknown {kind[:-1] if kind.endswith('s') else kind} {name!r}; available: {names}")
    return eps[name].load()


def describe() -> list[PluginInfo]:
    """Every registered plugin with the distribution that provides it (for `cswap list`)."""
    rows = []
    for kind in GROUPS:
        for name, ep in available(kind).items():
            dist = ep.dist.name if ep.dist is not None else "?"
            rows.append(PluginInfo(kind, name, ep.value, dist))
    return rows


def create(kind: str, name: str, options: dict | None = None, **context):
    """Instantiate plugin `name` of `kind` with validated options.

    A plugin class may declare a pydantic model `Options` (with `extra="forbid"`), so a
    mistyped option fails with the field's name instead of being silently ignored.
    `context` carries run-time objects (e.g. the task's class count) that are not config.
    """
    from pydantic import ValidationError

    cls = load(kind, name)
    options = dict(options or {})
    schema = getattr(cls, "Options", None)
    if schema is not None:
        try:
            parsed = schema(**options)
        except ValidationError as exc:
            raise ConfigError(f"invalid options for {kind[:-1]} {name!r}:\n{exc}") from exc
        return cls(parsed, **context)
    if options:
        raise ConfigError(f"{kind[:-1]} {name!r} takes no options, got {sorted(options)}")
    return cls(**context)
