"""Let mmsegmentation import on `mmcv-lite`, which has no compiled ops.

Why this exists: the `[seg]` extra installs `mmcv-lite==2.1.0` (seconds) instead of full mmcv
(a 21-minute source build here). mmcv-lite ships the Python files of `mmcv.ops` but not the
compiled `mmcv._ext` they load, so `import mmcv.ops` fails, and mmseg imports
`mmcv.ops.point_sample` (and `sigmoid_focal_loss`) at module level even though DDRNet uses
no compiled op. `install()` then registers a small stand-in `mmcv.ops` module with:

- `point_sample`: mmcv's own pure-PyTorch function (a `grid_sample` on coordinates in
  [0, 1]; mmcv has no compiled kernel for it), copied here so results are identical;
- `sigmoid_focal_loss`: imported unguarded by mmseg's focal loss, which calls it only for
  CUDA tensors (its CPU path is pure PyTorch); here it raises if called;
- any other name: raises `ModuleNotFoundError` naming the missing compiled op, which is
  what mmseg's optional imports (`try: from mmcv.ops import X except ModuleNotFoundError`)
  expect, so models that need a compiled op fail clearly when built, not silently.

When full mmcv (with `mmcv._ext`) is installed, `install()` does nothing (but silence two
import-time warnings that are not the user's business, see `silence_import_warnings`).
Call it before the first `import mmseg`: `import cswap.models.mmseg` does, so a user's own
script needs that one line before `import mmseg.apis` (README, Segmentation).
"""
from __future__ import annotations

import importlib.util
import sys
import types
import warnings

import torch
import torch.nn.functional as F

_STUB_NAME = "mmcv.ops"


def point_sample(input: torch.Tensor, points: torch.Tensor, align_corners: bool = False, **kwargs) -> torch.Tensor:
    """mmcv.ops.point_sample: sample `input` (N, C, H, W) at `points` in [0, 1]^2, shape
    (N, P, 2) or (N, Hg, Wg, 2); returns (N, C, P) or (N, C, Hg, Wg). Same code as mmcv 2.1."""
    add_dim = points.dim() == 3
    if add_dim:
        points = points.unsqueeze(2)
    output = F.grid_sample(input, points * 2.0 - 1.0, align_corners=align_corners, **kwargs)
    return output.squeeze(3) if add_dim else output


def _missing(name: str):
    if name.startswith("__"):  # module protocol probes (__path__, __file__...): not an op
        raise AttributeError(name)
    raise _error(name)


def _error(name: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(
        f"mmcv.ops.{name} needs mmcv's compiled extension, which mmcv-lite does not have; "
        "install full mmcv 2.1.x (a source build) to use a model that needs it",
        name="mmcv._ext",
    )


def _full_mmcv_present() -> bool:
    try:
        return importlib.util.find_spec("mmcv._ext") is not None
    except ModuleNotFoundError:  # mmcv itself is not installed
        return False


# Warnings mmcv-lite and mmseg print on import although nothing the user asked for is
# affected: an op DDRNet never uses, and mmseg's own deprecated call of its own function.
_NOT_THE_USERS_BUSINESS = (
    r"Fail to import ``MultiScaleDeformableAttention``",
    r"``build_loss`` would be deprecated soon",
)


def silence_import_warnings() -> None:
    """Filter the warnings above (only those messages; every other warning still shows)."""
    for message in _NOT_THE_USERS_BUSINESS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def install() -> bool:
    """Register the stand-in `mmcv.ops` if needed; True if it is (now) in place."""
    silence_import_warnings()
    if _full_mmcv_present():
        return False
    existing = sys.modules.get(_STUB_NAME)
    if existing is not None:
        return getattr(existing, "__cswap_bridge__", False)
    if importlib.util.find_spec("mmcv") is None:
        raise ModuleNotFoundError("mmcv is not installed; install the segmentation extra: pip install 'cswap[seg]'")
    import mmcv

    stub = types.ModuleType(_STUB_NAME, "C-SWAP stand-in for mmcv.ops on mmcv-lite (see models/mmcv_bridge.py)")
    stub.__cswap_bridge__ = True
    stub.point_sample = point_sample

    def sigmoid_focal_loss(*args, **kwargs):
        raise _error("sigmoid_focal_loss")

    stub.sigmoid_focal_loss = sigmoid_focal_loss
    stub.__getattr__ = _missing  # PEP 562: called for every other name
    sys.modules[_STUB_NAME] = stub
    mmcv.ops = stub
    return True
