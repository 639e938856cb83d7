"""Text a user types on the command line, parsed in one place, each failure one line.

Why: every option that carries structured text (`--criterion-options JSON`, `--test-option
NAME=V1,V2`, comma-separated lists) used to parse it where it was read, and a typo
(`'not json'`, `voting=[unclosed`) escaped as a raw traceback. Here each parse either returns
the value or raises a `ConfigError` naming the option, the text and what is wrong; what the
values mean is then validated by the option models that own them (pydantic), as for a config.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import yaml

from .errors import ConfigError


def parse_list(text: str, cast: Callable[[str], Any], what: str) -> list:
    """`a,b,c` -> [cast(a), cast(b), cast(c)] (empty items skipped)."""
    try:
        return [cast(t.strip()) for t in text.split(",") if t.strip()]
    except (ValueError, TypeError, OverflowError):
        raise ConfigError(f"{what} must be a comma-separated list, got {text!r}") from None


def parse_yaml_value(text: str, what: str) -> Any:
    """One value written as YAML (`0.1`, `true`, `pooled`, `[1, 2]`), as `--set` reads it:
    PyYAML's safe loader, so a tag never constructs an object."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f" at column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{what}: {text!r} is not a valid YAML value ({problem}{where})") from None


def parse_json_mapping(text: str, what: str, example: str) -> dict:
    """A JSON object of objects (`{"amp": {"tau": 0.02}}`): options by name."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{what} is not valid JSON ({exc}); expected e.g. {example}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{what} must be a JSON object mapping each name to an object of options, "
                          f"e.g. {example}; got {text!r}")
    return data
