"""Plugin lookup through Python entry points.

The core never imports a plugin module by name: tasks, scorers, significance tests, adapters,
criteria, model builders and fixture writers are found through the entry-point groups below, so a package
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

from .errors import ConfigError, one_line, validation_summary

GROUPS: dict[str, str] = {
    "tasks": "cswap.tasks",
    "scorers": "cswap.scorers",
    "tests": "cswap.tests",
    "adapters": "cswap.adapters",
    "criteria": "cswap.criteria",
    "models": "cswap.models",
    # `cswap fixture KIND DIR`: a function `(out: Path, train_steps: int | None) -> Path` writing a
    # small data folder, a model trained on it and a config into the empty folder `out`, and
    # returning the config's path; it may declare `requires` (modules it needs) like a plugin
    "fixtures": "cswap.fixtures",
}


class UnknownPluginError(ConfigError):
    """A config or call named a plugin that no installed distribution registers."""


class PluginLoadError(ConfigError):
    """A registered entry point cannot be imported (a typo in its target, a missing module)."""


class MissingDependencyError(PluginLoadError):
    """A plugin declares a module it needs (`requires`) that is not installed."""


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    value: str
    distribution: str
    status: str = ""  # with describe(check=True): "ok", or "BROKEN: <why>"


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
    """The object registered as `name` in group `kind`; the error lists what is available.
    An entry point that cannot be imported (a typo in its target, a missing dependency) is a
    `PluginLoadError` naming the entry point, its distribution and, for a missing module one
    of the distribution's extras provides, the `pip install` that adds it."""
    eps = available(kind)
    if name not in eps:
        names = ", ".join(eps) or "(none installed)"
        raise UnknownPluginError(f"unknown {_singular(kind)} {name!r}; available: {names}")
    ep = eps[name]
    if isinstance(ep, _Clash):
        raise PluginClashError(f"{_singular(kind)} {name!r} is registered differently by two distributions: "
                               f"{'; '.join(ep.sources)}; uninstall one of them")
    try:
        return ep.load()
    except Exception as exc:  # ImportError, AttributeError (a typo in the target), a module that raises
        raise PluginLoadError(f"{_singular(kind)} {name!r} = {ep.value} of {_where(ep.dist)} cannot be loaded: "
                              f"{type(exc).__name__}: {one_line(exc)}{install_hint(exc, ep.dist)}") from exc


def _singular(kind: str) -> str:
    return kind[:-1] if kind.endswith("s") else kind


def registered_name(kind: str, cls: type) -> str | None:
    """The name `cls` is registered under in group `kind`, if any (for messages)."""
    target = f"{cls.__module__}:{cls.__qualname__}"
    return next((name for name, ep in available(kind).items() if getattr(ep, "value", None) == target), None)


def install_hint(exc: BaseException, dist: Distribution | None = None) -> str:
    """`; install it with: pip install "cswap[xai]"` when `exc` is a missing module that an
    extra of `dist` (default: C-SWAP's own distribution) provides, else ""."""
    missing = getattr(exc, "name", None) if isinstance(exc, ImportError) else None
    if not missing:
        return ""
    extra = _extra_providing(missing.split(".")[0], dist)
    return f"; install it with: pip install \"{extra[0]}[{extra[1]}]\"" if extra else ""


def _extra_providing(module: str, dist: Distribution | None) -> tuple[str, str] | None:
    """(distribution, extra) whose requirements include the package that provides `module`
    (by name: `captum` for captum, `mmsegmentation` for mmseg); a user-facing extra is
    preferred to `dev`."""
    if dist is None:
        dist = next((d for d in distributions() if _is_builtin(d)), None)
        if dist is None:
            return None
    import re

    def norm(text: str) -> str:
        return re.sub(r"[-_.]+", "", text.lower())

    found = []
    for req in dist.requires or []:
        match = re.match(r"\s*([A-Za-z0-9_.-]+).*extra\s*==\s*[\"']([^\"']+)[\"']", req)
        if match and norm(match.group(1)).startswith(norm(module)):
            found.append(match.group(2))
    if not found:
        return None
    extra = next((e for e in found if e != "dev"), found[0])
    return dist.metadata["Name"], extra


def check_requirements(kind: str, name: str, cls) -> None:
    """Refuse, before building it, a plugin whose declared `requires` are not importable."""
    import importlib.util

    for module in getattr(cls, "requires", ()) or ():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            exc = ModuleNotFoundError(f"No module named {module!r}", name=module)
            hint = install_hint(exc) or f"; install {module}"
            raise MissingDependencyError(f"{_singular(kind)} {name!r} needs {module}, which is not installed{hint}")


def describe(check: bool = False) -> list[PluginInfo]:
    """Every registered plugin with the distribution that provides it (for `cswap list`);
    with `check`, each is loaded and `status` says whether it can be used: "ok", or why not
    (an entry point that does not load, a declared requirement that is missing)."""
    rows = []
    for kind in GROUPS:
        for name, ep in available(kind).items():
            dist = "two distributions" if isinstance(ep, _Clash) else (ep.dist.name if ep.dist is not None else "?")
            rows.append(PluginInfo(kind, name, ep.value, dist, _status(kind, name) if check else ""))
    return rows


def _status(kind: str, name: str) -> str:
    try:
        check_requirements(kind, name, load(kind, name))
    except ConfigError as exc:
        return "BROKEN: " + str(exc)
    return "ok"


def create(kind: str, name: str, options: dict | None = None):
    """Plugin `name` of `kind`, constructed as `cls(options)` with its validated `Options`
    (a pydantic model declared with `extra="forbid"`, so a mistyped option fails with the
    field's name), or as `cls()` when it declares none and none are given. Run-time objects
    reach plugins through the interface (`Criterion.rank(analysis, seed)`), never here."""
    from pydantic import ValidationError

    cls = load(kind, name)
    check_requirements(kind, name, cls)
    options = dict(options or {})
    schema = getattr(cls, "Options", None)  # plugins that do not derive from Configurable may lack it
    if schema is not None:
        try:
            parsed = schema(**options)
        except ValidationError as exc:
            raise ConfigError(f"invalid options for {_singular(kind)} {name!r}: {validation_summary(exc)}") from None
        return cls(parsed)
    if options:
        raise ConfigError(f"{_singular(kind)} {name!r} takes no options, got {sorted(options)}")
    return cls()


def describe_plugin(kind: str, plugin) -> dict:
    """What a plan or report records of a plugin it used: its registered name (or, for an
    object built by hand, `module:Class`) and its options as JSON values."""
    cls = type(plugin)
    name = registered_name(kind, cls) or f"{cls.__module__}:{cls.__qualname__}"
    options = getattr(plugin, "options", None)
    dumped = options.model_dump(mode="json") if hasattr(options, "model_dump") else {}
    return {"name": name, "options": dumped}
