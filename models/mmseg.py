"""mmsegmentation models as plain `images -> logits` modules (model builder `mmseg`).

Why a wrapper: mmseg's `EncoderDecoder.forward` takes data samples and returns them, while
the pruner, torch-pruning and the scorers need a module mapping a normalised image batch
(N, 3, H, W) to class logits (N, C, H, W). `SegLogits` runs the segmentor's own
`extract_feat` (backbone, then neck if any) and the decode head's `forward` in eval mode,
and upsamples the logits bilinearly to the input size, as mmseg's `predict` does.

Parameter names stay those of the segmentor (`backbone.*`, `neck.*`, `decode_head.*`,
`auxiliary_head.*`), so an mmseg checkpoint's `state_dict` loads through `model.weights`
without any key mapping: `cswap.files.load_checkpoint` already unwraps the `state_dict`
entry of an OpenMMLab checkpoint. Heads used only in training (DDRHead's `aux_head` and
`aux_cls_seg`, an `auxiliary_head`) are kept so the checkpoint's keys match; they never run,
so the unit discovery reports them as not used, and their parameters (38,355 of 5,734,278
for DDRNet-23-slim) stay in the parameter counts. Input normalisation (the config's
`data_preprocessor` mean, std and BGR->RGB) is done by the task, not here.

What a config can run: an mmseg config *file* is Python, and mmengine executes it to read
it, as mmseg itself does, so only trusted files may be named (`model.kwargs.config`, the
segmentation task's `config`). Everything else is data and is checked before anything is
built (`check_config`): mmengine resolves a `type` that is not a registered name by importing
it as a dotted path (`type: os.system` would call `os.system`), so every `type` under `model`
(the only section C-SWAP builds; pipelines and runner sections are never built) and every
`type` given in `cfg_options` must be a name registered in mmseg's or mmengine's registries, `_scope_`/`default_scope` must be
one of theirs, `custom_imports` is refused, and `cfg_options` may not touch the keys that
change what is imported. While the segmentor is built, mmengine's dotted-path fallback is
switched off as well (`_registered_types_only`), in case a registry looks a name up where
the check did not expect it.

OpenMMLab checkpoints saved by a training run may also hold pickled training state
(`message_hub`, optimizer), which `weights_only` loading refuses; either set
`model.allow_pickle: true` for a checkpoint you trust, or save its `state_dict` once:
`torch.save(torch.load(p, weights_only=False)["state_dict"], "weights.pt")`.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cswap.errors import ConfigError

from . import mmcv_bridge


def resolve_config(config: str | Path) -> Path:
    """A config file path, or the file name of a config shipped inside the installed mmseg
    (`mmseg/.mim/configs/<model>/<name>.py`), so configs work without an mmseg checkout."""
    path = Path(config).expanduser()
    if path.is_file():
        return path
    mmcv_bridge.install()
    import mmseg

    shipped = Path(mmseg.__file__).parent / ".mim" / "configs"
    name = path.name if path.suffix == ".py" else path.name + ".py"
    found = sorted(shipped.rglob(name))
    if not found:
        raise ConfigError(
            f"mmseg config {config!r} is neither a file nor a config shipped with mmseg "
            f"(searched {shipped}); give a path or a name like "
            "'ddrnet_23-slim_in1k-pre_2xb6-120k_cityscapes-1024x1024.py'"
        )
    return found[0]


SAFE_SCOPES = ("mmseg", "mmengine")
# cfg_options keys that would change what mmengine imports or where it looks names up
_IMPORT_KEYS = ("custom_imports", "_base_", "default_scope", "_scope_")


def load_config(config: str | Path, cfg_options: dict | None = None):
    """The mmengine Config of `config` (see `resolve_config`), with `cfg_options` merged and
    every `type` checked (`check_config`). The file itself is executed: it must be trusted."""
    mmcv_bridge.install()
    from mmengine import Config

    if cfg_options is not None and not isinstance(cfg_options, dict):
        raise ConfigError(f"model.kwargs.cfg_options must be a mapping of config keys, not {type(cfg_options).__name__}")
    if cfg_options:
        _check_options(cfg_options)
    path = resolve_config(config)
    try:
        cfg = Config.fromfile(str(path), import_custom_modules=False)
    except Exception as exc:  # the file is Python: anything it raises means it cannot be read
        raise ConfigError(f"cannot read mmseg config {path}: {type(exc).__name__}: {exc}") from exc
    if cfg_options:
        _walk(cfg_options, "cfg_options", "model.kwargs.")
        cfg.merge_from_dict(cfg_options)
    check_config(cfg, str(path))
    return cfg


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
def _registered_types_only():
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


class SegLogits(nn.Module):
    """An mmseg `EncoderDecoder` as `images -> logits at input resolution` (eval only)."""

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.backbone = segmentor.backbone
        if getattr(segmentor, "with_neck", False):
            self.neck = segmentor.neck
        self.decode_head = segmentor.decode_head
        if getattr(segmentor, "with_auxiliary_head", False):
            self.auxiliary_head = segmentor.auxiliary_head
        self.align_corners = bool(getattr(segmentor, "align_corners", False))
        self.num_classes = int(self.decode_head.out_channels)
        self.dataset_meta = getattr(segmentor, "dataset_meta", None)

    def train(self, mode: bool = True) -> "SegLogits":
        if mode:
            raise RuntimeError("SegLogits is an inference wrapper; train the mmseg segmentor itself")
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.backbone(images)
        if hasattr(self, "neck"):
            x = self.neck(x)
        logits = self.decode_head(x)
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        return logits


def build_mmseg_model(config: str, cfg_options: dict | None = None) -> SegLogits:
    """Model builder `mmseg`: the segmentor of an mmseg config at random initialisation.

    `config` is a path or the name of a config shipped with mmseg. The backbone's ImageNet
    `init_cfg` is dropped (nothing is downloaded; `model.weights` loads the trained
    checkpoint afterwards), and SyncBN, used by the Cityscapes configs, becomes BatchNorm.
    """
    mmcv_bridge.install()
    from mmengine.model import revert_sync_batchnorm
    from mmseg.apis import init_model

    cfg = load_config(config, cfg_options)
    if cfg.model.get("type") not in ("EncoderDecoder",):
        raise ConfigError(f"model builder mmseg supports EncoderDecoder segmentors, not {cfg.model.get('type')!r}")
    with _registered_types_only():
        segmentor = revert_sync_batchnorm(init_model(cfg, checkpoint=None, device="cpu"))
    return SegLogits(segmentor).eval()
