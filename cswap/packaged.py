"""The run configs that ship inside the installed package, to start from outside a checkout.

Why: `configs/*.yaml` of a clone are not where an installed C-SWAP can see them, and their
relative paths name files beside them. The demo config (`cswap/demo/demo.yaml`, with its
data and checkpoint) and the configs of the repository's `configs/` folder (installed as
`cswap/configs/`) are packaged; `cswap config NAME` prints one, with every relative path
that names a file shipped beside it made absolute, so the printed copy works from any
folder (`cswap config demo > my.yaml && cswap prune my.yaml`), and `cswap prune NAME` runs it
in place. Relative paths to files that are not shipped (a checkpoint, a dataset root) stay
relative: they are read against the folder of the copy, where the user puts them.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

from .errors import ConfigError

_HERE = Path(__file__).resolve().parent


def _config_folders() -> list[Path]:
    """Installed: cswap/configs; in a checkout (editable install): the repository's configs/."""
    return [folder for folder in (_HERE / "configs", _HERE.parent / "configs") if folder.is_dir()][:1]


def packaged_configs() -> dict[str, Path]:
    """Every packaged config by name (its file name without .yaml), the demo first."""
    found = {"demo": _HERE / "demo" / "demo.yaml"}
    for folder in _config_folders():
        found.update({p.stem: p for p in sorted(folder.glob("*.yaml"))})
    return found


def find(name: str) -> Path:
    configs = packaged_configs()
    if name not in configs:
        raise ConfigError(f"no packaged config {name!r}; packaged: {', '.join(configs)} (or give a file)")
    return configs[name]


def config_argument(text: str | Path) -> Path:
    """What `cswap prune|curve|sweep CONFIG` reads: the file, else the packaged config of
    that name (a file of the same name in the current folder wins)."""
    path = Path(text)
    if path.is_file() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    return find(str(text)) if str(text) in packaged_configs() else path


def summary(path: Path) -> str:
    """The first comment line of a config, its one-line description."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def portable_text(name: str) -> str:
    """The packaged config's text with each relative path that names a shipped file made
    absolute (comments and layout kept)."""
    from .config import load_config_text, resolve_relative_paths

    path = find(name)
    text = path.read_text()
    data = load_config_text(text, path)
    resolved = resolve_relative_paths(copy.deepcopy(data), path.parent)
    for old, new in _changed_strings(data, resolved):
        if Path(new).exists():
            text = re.sub(rf"(:\s*)([\"']?){re.escape(old)}\2(?=\s*(#.*)?$)", lambda m: m.group(1) + new, text,
                          flags=re.MULTILINE)
    return f"# packaged config {name!r} ({path}); shipped files are named by absolute paths\n" + text


def _changed_strings(a, b):
    """(old, new) for every string leaf that differs between two parallel YAML trees."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a:
            yield from _changed_strings(a[key], b.get(key))
    elif isinstance(a, str) and isinstance(b, str) and a != b:
        yield a, b


def listing() -> str:
    rows = packaged_configs()
    width = max(len(n) for n in rows)
    return "\n".join(f"{name:<{width}}  {summary(path)}" for name, path in rows.items())

