"""Atomic file writes and safe checkpoint loading.

A file is written to a temporary name in the same folder and renamed into place, so a crash
never leaves a half-written plan or model that looks complete. A write that fails (no
permission, a full disk) is an `OutputError` naming the file, never a half-file.
"""
from __future__ import annotations

import json
import math

import os
import tempfile
import zipfile
from pathlib import Path

import torch

from .errors import DataError, ModelError, OutputError

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    """The process umask (read without changing it where /proc allows; os.umask sets it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def describe_os_error(exc: BaseException) -> str:
    """One line for an OSError or a torch writer's RuntimeError (e.g. a full disk)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _atomic(path: str | Path, write) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {describe_os_error(exc)}") from exc
    try:
        # mkstemp creates 0600; the file gets the permissions any other file would (umask)
        os.chmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)):  # torch's writer reports a full disk as RuntimeError
            raise OutputError(f"cannot write {path}: {describe_os_error(exc)}") from exc
        raise
    return path


def remove_leftover_temporaries(folder: str | Path) -> list[Path]:
    """Delete temporaries that a killed `_atomic` writer left in `folder` (only call it while
    no writer is active there, e.g. under the run directory's lock)."""
    gone = []
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        gone.append(tmp)
    return gone


def write_text_atomic(path: str | Path, text: str) -> Path:
    return _atomic(path, lambda f: f.write(text.encode()))


def save_state_dict_atomic(state_dict: dict, path: str | Path) -> Path:
    return _atomic(path, lambda f: torch.save(state_dict, f))


def read_user_text(path: str | Path) -> str:
    """The text of a file a user names or receives (a run directory's config.yaml, plan.json,
    report.json): an unreadable file or bytes that are not UTF-8 are a `DataError` naming it,
    never a raw `UnicodeDecodeError`."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not a text file (byte {exc.start} is not UTF-8); was it truncated or replaced?") \
            from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {describe_os_error(exc)}") from exc



def json_text(data, indent: int | None = 1) -> str:
    """`data` as strict JSON text (a line end included): NaN and infinities, which `json.dumps`
    writes as bare `NaN` that other readers refuse (a class absent from a split has no IoU),
    become null."""
    def strict(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(v) for v in value]
        return value

    return json.dumps(strict(data), indent=indent, allow_nan=False) + "\n"


def read_json_object(path: str | Path) -> dict:
    """A JSON object from a file a user names or receives (plan.json, pruned.json), or a
    one-line `DataError` naming the file: truncated, edited or not an object."""
    try:
        data = json.loads(read_user_text(path))
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); was it truncated or edited?") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} does not hold a JSON object")
    return data


def load_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict:
    """Load a state dict. Only tensors and plain containers unless `allow_pickle` is set,
    because unpickling an arbitrary checkpoint runs arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as exc:
        raise ModelError(_unreadable(path, exc, allow_pickle)) from exc
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ModelError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _unreadable(path: Path, exc: Exception, allow_pickle: bool) -> str:
    """Why `torch.load` failed, in one line: a checkpoint that needs full pickle (it names
    globals outside the weights-only allow-list) is told apart from a file that is not a
    checkpoint at all, which no option would load."""
    text = str(exc)
    with open(path, "rb") as f:
        head = f.read(2)
    archive, pickle = zipfile.is_zipfile(path), head.startswith(b"\x80")
    if not allow_pickle and "Weights only load failed" in text and (archive or pickle):
        needed = next((line.strip() for line in text.splitlines() if "Unsupported global" in line), "")
        needed = needed.split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "")
        return (f"checkpoint {path} needs full pickle to load{f' ({needed})' if needed else ''}, which can run "
                "arbitrary code; set model.allow_pickle: true only if you trust its source")
    if archive or pickle or head == b"PK":
        return f"cannot read checkpoint {path} (truncated or corrupt?): {describe_os_error(exc)}"
    return f"checkpoint {path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)"


def write_native(model, folder: str | Path) -> list[Path]:
    """The files of the model family's own format beside ours, when its class defines
    `save_native(folder)` (mmseg's `SegLogits` writes an mmseg checkpoint and config)."""
    save = getattr(type(model), "save_native", None)  # a model, not a plugin: an optional method of its class
    return list(save(model, Path(folder))) if save is not None else []
