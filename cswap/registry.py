"""Plugin lookup through Python entry points.

The core never imports a plugin module by name: tasks, scorers, significance tests, adapters,
criteria and model builders are found through the entry-point groups below, so a package
installed beside ours (or a `*.dist-info` folder on `sys.path`) extends C-SWAP without any
change here, and a config can only name code that some installed distribution registered.

A name is resolved over every distribution on `sys.path`, not only the first one found
(`importlib.metadata.entry_points` keeps one distribution per name, so a `cswap-*.dist-info`
in the current directory would hide ours under `python -m cswap`). C-SWAP's own
distribution, the one installed from this source tree, always wins a clash; two other
distributions registering one name differently is an error naming both.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import Distribution, EntryPoint, distributions
from pathlib import Path

from .errors import ConfigError, validation_summary

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


log = logging.getLogger("cswap")


class PluginClashError(ConfigError):
    """Two distributions other than C-SWAP's own register one plugin name differently."""


@dataclass(frozen=True)
class _Clash:
    """Stands in `available()` for a name two distributions register differently; `load`
    raises, listing continues."""

    name: str
    sources: tuple[str, ...]

    @property
    def value(self) -> str:
        return "CLASH: " + " vs ".join(self.sources)


@lru_cache(maxsize=None)
def _source_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _is_builtin(dist: Distribution) -> bool:
    """C-SWAP's own distribution: named cswap and installed from this source tree (its
    metadata beside our packages, or an editable install pointing here)."""
    if (dist.metadata["Name"] or "").lower() != "cswap":
        return False
    if Path(str(dist.locate_file(""))).resolve() == _source_root():
        return True
    direct = dist.read_text("direct_url.json") or ""
    return f'"file://{_source_root()}"' in direct.replace(" ", "")


def _where(dist: Distribution | None) -> str:
    if dist is None:
        return "?"
    return f"{dist.metadata['Name']} {dist.version} at {dist.locate_file('')}"


def available(kind: str) -> dict[str, EntryPoint | _Clash]:
    """Entry points of one kind, by name, over all distributions (see the module docstring):
    the built-in one when C-SWAP registers the name, else the only one, else a `_Clash`."""
    found: dict[str, list[tuple[EntryPoint, bool]]] = {}
    group = _group(kind)
    for dist in distributions():
        if group not in (dist.read_text("entry_points.txt") or ""):  # cheap: most distributions have none
            continue
        builtin = _is_builtin(dist)
        for ep in dist.entry_points.select(group=group):
            found.setdefault(ep.name, []).append((ep, builtin))
    chosen: dict[str, EntryPoint | _Clash] = {}
    for name, candidates in found.items():
        own = [ep for ep, builtin in candidates if builtin]
        values = {ep.value for ep, _ in candidates}
        if own:
            chosen[name] = own[0]
            for ep, builtin in candidates:
                if not builtin and ep.value != own[0].value:
                    log.debug("plugin %s %r of %s ignored: the built-in one wins", kind, name, _where(ep.dist))
        elif len(values) == 1:
            chosen[name] = candidates[0][0]
        else:
            chosen[name] = _Clash(name, tuple(f"{_where(ep.dist)} ({ep.value})" for ep, _ in candidates))
    return dict(sorted(chosen.items()))


def load(kind: str, name: str):
    """The object registered as `name` in group `kind`; the error lists what is available."""
    eps = available(kind)
    if name not in eps:
        names = ", ".join(eps) or "(none installed)"
        raise UnknownPluginError(f"unknown {kind[:-1] if kind.endswith('s') else kind} {name!r}; available: {names}")
    ep = eps[name]
    if isinstance(ep, _Clash):
        raise PluginClashError(f"{kind[:-1]} {name!r} is registered differently by two distributions: "
                               f"{'; '.join(ep.sources)}; uninstall one of them")
    return ep.load()


def describe() -> list[PluginInfo]:
    """Every registered plugin with the distribution that provides it (for `cswap list`)."""
    rows = []
    for kind in GROUPS:
        for name, ep in available(kind).items():
            dist = "two distributions" if isinstance(ep, _Clash) else (ep.dist.name if ep.dist is not None else "?")
            rows.append(PluginInfo(kind, name, ep.value, dist))
    return rows


def create(kind: str, name: str, options: dict | None = None):
    """Plugin `name` of `kind`, constructed as `cls(options)` with its validated `Options`
    (a pydantic model declared with `extra="forbid"`, so a mistyped option fails with the
    field's name), or as `cls()` when it declares none and none are given. Run-time objects
    reach plugins through the interface (`Criterion.rank(analysis, seed)`), never here."""
    from pydantic import ValidationError

    cls = load(kind, name)
    options = dict(options or {})
    schema = getattr(cls, "Options", None)  # plugins that do not derive from Configurable may lack it
    if schema is not None:
        try:
            parsed = schema(**options)
        except ValidationError as exc:
            raise ConfigError(f"invalid options for {kind[:-1]} {name!r}: {validation_summary(exc)}") from None
        return cls(parsed)
    if options:
        raise ConfigError(f"{kind[:-1]} {name!r} takes no options, got {sorted(options)}")
    return cls()
