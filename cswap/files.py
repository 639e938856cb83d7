"""Atomic file writes and safe checkpoint loading.

A file is written to a temporary name in the same folder and renamed into place, so a crash
never leaves a half-written plan or model that looks complete.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .errors import ModelError


def _atomic(path: str | Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return _atomic(path, lambda f: f.write(text.encode()))


def save_state_dict_atomic(state_dict: dict, path: str | Path) -> Path:
    return _atomic(path, lambda f: torch.save(state_dict, f))


def load_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict:
    """Load a state dict. Only tensors and plain containers unless `allow_pickle` is set,
    because unpickling an arbitrary checkpoint runs arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as exc:
        if not allow_pickle and "weights_only" in str(exc):
            raise ModelError(
                f"checkpoint {path} needs full pickle to load, which can run arbitrary code; "
                "set model.allow_pickle: true only if you trust its source"
            ) from exc
        raise ModelError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ModelError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj
