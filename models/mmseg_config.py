"""Reading an mmseg config without running what is not trusted, and checking what it builds.

Why a module of its own: an mmseg config is where a file a user names or receives could make
C-SWAP run code, in three ways, each closed here.

1. The file itself. mmengine reads a `.py` config by executing it, and a `.yaml` one with
   PyYAML's unsafe loader (`!!python/object/apply:os.system` runs). So YAML and JSON configs
   are read here as data (`yaml.safe_load`, `json`; `_base_` files by the same rules, merged
   with mmengine's own merge) and handed to mmengine as a dict; a `.py` is read only when it
   is one of the configs installed inside the mmseg package (installed code, trusted like
   the package), or under the user's explicit opt-in at invocation time (`cswap.trust`:
   `--trust-python-config`, never a config field).
2. The `type` names in it. mmengine resolves a `type` that is not a registered name by
   importing it as a dotted path (`type: os.system` would call `os.system`), so every `type`
   under `model` (the only section C-SWAP builds; pipelines and runner sections are never
   built) and every `type` given in `cfg_options` must be registered in mmseg's or mmengine's
   registries, `_scope_`/`default_scope` must be one of theirs, `custom_imports` is refused,
   and `cfg_options` may not touch the keys that change what is imported (`check_config`).
   While the segmentor is built, mmengine's dotted-path fallback is switched off as well
   (`registered_types_only`), in case a registry looks a name up where the check did not
   expect it.
3. Its shape. A segmentor without a backbone or a decode head (e.g. `cfg_options` that delete
   them) is refused by name (`check_segmentor`) instead of failing inside mmseg.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

from cswap.errors import ConfigError, one_line

from . import mmcv_bridge


def shipped_configs() -> Path:
    """The folder of the configs installed with mmseg (`mmseg/.mim/configs`), resolved."""
    mmcv_bridge.install()
    import mmseg

    return (Path(mmseg.__file__).parent / ".mim" / "configs").resolve()


def resolve_config(config: str | Path, folder: Path | None = None) -> Path:
    """A config file path (relative ones against `folder`, else the current folder), or the
    file name of a config shipped inside the installed mmseg (`mmseg/.mim/configs/<model>/
    <name>.py`), so configs work without an mmseg checkout."""
    path = Path(config).expanduser()
    if folder is not None and not path.is_absolute():
        path = folder / path
    if path.is_file():
        return path
    if path.suffix in DATA_SUFFIXES:
        raise ConfigError(f"mmseg config {config!r} does not exist")
    shipped = shipped_configs()
    name = path.name if path.suffix == ".py" else path.name + ".py"
    found = sorted(shipped.rglob(name))
    if not found:
        raise ConfigError(
            f"mmseg config {config!r} is neither a file nor a config shipped with mmseg "
            f"(searched {shipped}); give a path or a name like "
            "'ddrnet_23-slim_in1k-pre_2xb6-120k_cityscapes-1024x1024.py'"
        )
    return found[0]


def is_shipped(path: Path) -> bool:
    """Whether `path` (symbolic links followed) is one of the configs installed with mmseg:
    installed code, trusted like the package itself."""
    return Path(path).resolve().is_relative_to(shipped_configs())


SAFE_SCOPES = ("mmseg", "mmengine")
# cfg_options keys that would change what mmengine imports or where it looks names up
_IMPORT_KEYS = ("custom_imports", "_base_", "default_scope", "_scope_")
DATA_SUFFIXES = (".yaml", ".yml", ".json")

# The config C-SWAP writes beside a pruned mmseg checkpoint (models/mmseg.py, `pruned_config`):
# `model.type` is a name no registry holds, and contains no dot, so mmengine never tries to
# import it; stock `init_model` then fails showing it. The real type is kept under PRUNED_KEY.
PRUNED_KEY, PRUNED_FORMAT = "cswap_pruned", "cswap-mmseg-pruned/1"
REBUILD = "from cswap.models.mmseg import init_pruned_model; init_pruned_model(config, checkpoint)"
REFUSED_TYPE = ("PrunedByCSwap (a pruned model: stock init_model would build the unpruned widths; rebuild it with "
                "init_pruned_model(config, checkpoint) from cswap/models/mmseg)")


def load_config(config: str | Path, cfg_options: dict | None = None):
    """The mmengine Config of `config` (see `resolve_config`, `read_config`), with
    `cfg_options` merged and every `type` checked (`check_config`)."""
    mmcv_bridge.install()
    if cfg_options is not None and not isinstance(cfg_options, dict):
        raise ConfigError("model.kwargs.cfg_options must be a mapping of config keys, not "
                          f"{type(cfg_options).__name__}")
    if cfg_options:
        _check_options(cfg_options)
    path = resolve_config(config)
    cfg = read_config(path)
    if cfg_options:
        _walk(cfg_options, "cfg_options", "model.kwargs.")
        try:
            cfg.merge_from_dict(cfg_options)
        except Exception as exc:  # mmengine's own message: a key path that crosses a non-mapping
            raise ConfigError(f"model.kwargs.cfg_options cannot be merged into {path}: {type(exc).__name__}: "
                              f"{one_line(exc)}") from exc
    check_config(cfg, str(path))
    return cfg


def read_config(path: Path, _chain: tuple[Path, ...] = ()):
    """An mmseg config file as an mmengine Config, executing nothing that is not trusted.

    YAML and JSON are data: read with PyYAML's safe loader (mmengine's own reader is not
    safe) or json, their `_base_` files (relative to the file, or shipped names) read by the
    same rules and merged first. A `.py` runs when read: only mmseg's shipped configs, or
    the user's own under `cswap.trust` (the `--trust-python-config` opt-in)."""
    from mmengine import Config

    if path.resolve() in _chain:
        raise ConfigError(f"mmseg config {path}: its _base_ files include it again (a cycle)")
    if path.suffix == ".py":
        return _read_python(path)
    if path.suffix not in DATA_SUFFIXES:
        raise ConfigError(f"mmseg config {path} must be a .yaml, .yml or .json file (or a .py config)")
    data = _restore_pruned(_read_data(path), path)
    bases = [read_config(resolve_config(base, path.parent), (*_chain, path.resolve()))
             for base in _bases(data.pop("_base_", []), path)]
    cfg = Config()
    try:
        for part in (*(base.to_dict() for base in bases), data):
            cfg.merge_from_dict(part)
    except Exception as exc:  # mmengine's merge: a key that is not text, a mapping onto a list...
        raise ConfigError(f"mmseg config {path} cannot be merged onto its _base_: {type(exc).__name__}: "
                          f"{one_line(exc)}") from exc
    return cfg


def _read_python(path: Path):
    from mmengine import Config

    from cswap.trust import opt_in_hint, python_configs_trusted

    if not (is_shipped(path) or python_configs_trusted()):
        json_twin = path.with_suffix(".json")
        raise ConfigError(
            f"mmseg config {path} is Python, which runs when it is read; C-SWAP reads only mmseg's shipped configs "
            f"and YAML/JSON configs as data. Convert it once where you trust it (python -c \"from mmengine import "
            f"Config; Config.fromfile('{path}').dump('{json_twin}')\") and name the .json, or {opt_in_hint()}")
    try:
        return Config.fromfile(str(path), import_custom_modules=False)
    except Exception as exc:  # the file is Python: anything it raises means it cannot be read
        raise ConfigError(f"cannot read mmseg config {path}: {type(exc).__name__}: {one_line(exc)}") from exc


def _read_data(path: Path) -> dict:
    """The mapping in a YAML or JSON file, read as data only."""
    import json

    import yaml

    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read mmseg config {path}: {one_line(exc)}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"mmseg config {path} does not hold a mapping of names to settings")
    return _pairs_as_tuples(data)


# sizes mmcv's transforms and mmseg's preprocessor accept only as tuples (`isinstance(scale,
# tuple)`), which JSON and safe YAML write as lists
_PAIRS = frozenset({"scale", "img_scale", "crop_size", "size", "ratio_range", "scale_factor"})


def _pairs_as_tuples(node, key: str = ""):
    if isinstance(node, dict):
        return {k: _pairs_as_tuples(v, k) for k, v in node.items()}
    if isinstance(node, list):
        if key in _PAIRS and len(node) == 2 and all(isinstance(v, (int, float)) for v in node):
            return tuple(node)
        return [_pairs_as_tuples(v) for v in node]
    return node


def _restore_pruned(data: dict, path: Path) -> dict:
    """A config written by C-SWAP beside a pruned checkpoint (PRUNED_KEY) with its real
    `model.type` back; any other config as it is."""
    mark = data.pop(PRUNED_KEY, None)
    if mark is None:
        return data
    model = data.get("model")
    if not (isinstance(mark, dict) and mark.get("format") == PRUNED_FORMAT and isinstance(mark.get("model_type"), str)
            and isinstance(model, dict)):
        raise ConfigError(f"mmseg config {path}: {PRUNED_KEY} is not the {PRUNED_FORMAT} record C-SWAP writes")
    model["type"] = mark["model_type"]
    return data


def _bases(bases, path: Path) -> list[str]:
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"mmseg config {path}: _base_ must be a file name or a list of them")
    return bases


def _check_options(options: dict, prefix: str = "cfg_options") -> None:
    for key, value in options.items():
        path = f"{prefix}.{key}"
        if any(part in _IMPORT_KEYS for part in str(key).split(".")):
            raise ConfigError(f"model.kwargs.{path} may not be set: it changes what mmengine imports")
        if isinstance(value, dict):
            _check_options(value, path)


@functools.lru_cache(maxsize=1)
def registered_names() -> dict[str, frozenset[str]]:
    """Names registered in mmseg's and mmengine's registries, by scope (modules they list
    as locations imported first, as mmengine does on first use)."""
    mmcv_bridge.install()
    import mmengine.registry
    import mmseg.registry
    from mmengine.registry import Registry

    names: dict[str, set[str]] = {scope: set() for scope in SAFE_SCOPES}
    for module in (mmseg.registry, mmengine.registry):
        for registry in vars(module).values():
            if isinstance(registry, Registry) and registry.scope in names:
                registry.import_from_location()
                names[registry.scope].update(registry.module_dict)
    return {scope: frozenset(v) for scope, v in names.items()}


def check_config(cfg, source: str) -> None:
    """Refuse anything in an mmengine config that would make mmengine import code by name
    when its `model` is built: a `type` that is not registered with mmseg or mmengine, a
    foreign `_scope_` or `default_scope`, `custom_imports`. The error names the key."""
    if cfg.get("custom_imports"):
        imports = cfg["custom_imports"].get("imports") if isinstance(cfg["custom_imports"], dict) else None
        raise ConfigError(f"mmseg config {source}: custom_imports ({imports}) is not supported: C-SWAP builds only "
                          "types registered by mmseg and mmengine, and never imports modules a config names")
    scope = cfg.get("default_scope")
    if scope is not None and scope not in SAFE_SCOPES:
        raise ConfigError(f"mmseg config {source}: default_scope {scope!r} is not one of {', '.join(SAFE_SCOPES)}")
    model = cfg.get("model")
    _walk(model.to_dict() if hasattr(model, "to_dict") else model, "model", f"mmseg config {source}: ")


def _walk(node, path: str, source: str) -> None:
    """Check every `type` and `_scope_` under `node`; `source` prefixes the key in errors."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            leaf = str(key).rpartition(".")[2]  # cfg_options keys may be dotted paths
            if leaf == "type":
                _check_type(value, where, source)
            elif leaf == "_scope_" and value not in SAFE_SCOPES:
                raise ConfigError(f"{source}{where} = {value!r} is not one of {', '.join(SAFE_SCOPES)}")
            else:
                _walk(value, where, source)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _walk(value, f"{path}[{i}]", source)


def _check_type(value, where: str, source: str) -> None:
    if not isinstance(value, str):  # a class in a (trusted) Python config: only from the OpenMMLab stack
        module = getattr(value, "__module__", "") or ""
        if callable(value) and module.split(".")[0] in (*SAFE_SCOPES, "mmcv", "torch"):
            return
        raise ConfigError(f"{source}{where} = {value!r} is not a registered mmseg/mmengine type")
    scope, _, name = value.partition(".") if "." in value else (None, "", value)  # as mmengine splits it
    names = registered_names()
    known = names.get(scope, frozenset()) if scope else names["mmseg"] | names["mmengine"]
    if name not in known:
        raise ConfigError(
            f"{source}{where} = {value!r} is not a type registered in mmseg's or mmengine's "
            "registries; C-SWAP never imports a dotted path named in a config")


@contextlib.contextmanager
def registered_types_only():
    """mmengine's `Registry.get` imports an unknown name as a dotted path; here it finds
    nothing instead, and the name is reported (mmengine would wrap any error we raised)."""
    import mmengine.registry.registry as mm_registry

    original, refused = mm_registry.get_object_from_string, []

    def refuse(name: str):
        refused.append(name)
        return None

    mm_registry.get_object_from_string = refuse
    try:
        yield
    except Exception as exc:
        if refused:
            raise ConfigError(f"the mmseg config names {refused[0]!r}, which is not registered in the registry "
                              "that builds it; C-SWAP never imports a dotted path named in a config") from exc
        raise
    finally:
        mm_registry.get_object_from_string = original


def check_segmentor(cfg, source: str) -> None:
    """An `EncoderDecoder` with a backbone and a decode head, each a mapping with a `type`:
    what `SegLogits` needs, named here rather than failing inside mmseg."""
    model = cfg.get("model")
    if not isinstance(model, dict):
        raise ConfigError(f"mmseg config {source} has no model section")
    if model.get("type") != "EncoderDecoder":
        raise ConfigError(f"model builder mmseg supports EncoderDecoder segmentors, not {model.get('type')!r} "
                          f"({source})")
    for part in ("backbone", "decode_head"):
        if not isinstance(model.get(part), dict) or not isinstance(model[part].get("type"), str):
            raise ConfigError(f"mmseg config {source}: model.{part} is {model.get(part)!r}; an EncoderDecoder needs a "
                              f"{part} with a type (did model.kwargs.cfg_options delete it?)")
