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
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cswap.errors import ConfigError

from . import mmcv_bridge

if importlib.util.find_spec("mmcv") is not None:  # `import cswap.models.mmseg` makes `import mmseg.apis` work
    mmcv_bridge.install()


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
    """An mmseg `EncoderDecoder` as `images -> logits at input resolution` (eval only).

    It is also an mmseg model again where mmseg needs one: `cfg`, `dataset_meta` and
    `test_step` are the segmentor's, so `mmseg.apis.inference_model(model, image)` works on it,
    pruned or not, and `segmentor()` gives the `EncoderDecoder` itself (the same, possibly
    pruned, modules). The segmentor is kept outside the module tree (`_shell`), so parameter
    names and checkpoints are those of the segmentor's backbone and heads, nothing more.
    """

    def __init__(self, segmentor: nn.Module, cfg=None):
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
        self.cfg = cfg if cfg is not None else getattr(segmentor, "cfg", None)
        object.__setattr__(self, "_shell", segmentor)  # not a submodule: no duplicate parameters

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

    def segmentor(self) -> nn.Module:
        """The mmseg `EncoderDecoder` made of this model's current modules (pruned ones
        included), in eval mode on their device, with `cfg` and `dataset_meta`."""
        shell = self._shell
        for name in ("backbone", "neck", "decode_head", "auxiliary_head"):
            if name in self._modules:
                setattr(shell, name, self._modules[name])
        device = next(self.parameters()).device
        shell.cfg, shell.dataset_meta = self.cfg, self.dataset_meta
        return shell.to(device).eval()

    def test_step(self, data):
        """mmseg's `BaseModel.test_step` (what `mmseg.apis.inference_model` calls)."""
        return self.segmentor().test_step(data)

    def save_native(self, folder: Path) -> list[Path]:
        """An mmseg-format checkpoint of this model and its mmseg config, in `folder`
        (`cswap prune` calls it for the pruned model); `init_pruned_model` reads them back."""
        return save_mmseg_checkpoint(self, Path(folder))


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
    return SegLogits(segmentor, cfg).eval()


def input_normalisation(cfg) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(mean, std, bgr_to_rgb) of an mmseg config's `data_preprocessor`: what the segmentor
    expects its input images to be normalised with."""
    pre = cfg.get("data_preprocessor") or cfg.model.get("data_preprocessor") or {}
    mean = torch.tensor(pre.get("mean", [123.675, 116.28, 103.53]), dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(pre.get("std", [58.395, 57.12, 57.375]), dtype=torch.float32).view(1, -1, 1, 1)
    return mean, std, bool(pre.get("bgr_to_rgb", True))


# ---- back to mmseg: an mmseg checkpoint of a pruned model, and reading it ---------------------

CHECKPOINT, CONFIG = "mmseg_pruned.pth", "mmseg_config.py"


def save_mmseg_checkpoint(model: SegLogits, folder: Path) -> list[Path]:
    """`folder/mmseg_pruned.pth` ({"meta", "state_dict"}, as mmseg's own checkpoints, keys of
    the segmentor) and `folder/mmseg_config.py` (the config the model was built from). The
    pruned widths are the checkpoint's shapes: `init_pruned_model` builds the config's
    segmentor and gives every layer the checkpoint's shape before loading it."""
    import mmseg

    from cswap.files import save_state_dict_atomic, write_text_atomic

    if model.cfg is None:
        raise ConfigError("this SegLogits has no mmseg config to save (build it with build_mmseg_model)")
    segmentor = model.segmentor()
    meta = {"mmseg_version": mmseg.__version__, "pruned_by": "C-SWAP",
            "rebuild": "cswap.models.mmseg.init_pruned_model(config, checkpoint)"}
    dataset_meta = model.dataset_meta or _known_dataset_meta(model.num_classes)
    if dataset_meta:
        meta["dataset_meta"] = {k: list(v) if isinstance(v, tuple) else v for k, v in dataset_meta.items()}
    state = {k: v.detach().cpu() for k, v in segmentor.state_dict().items()}
    return [save_state_dict_atomic({"meta": meta, "state_dict": state}, folder / CHECKPOINT),
            write_text_atomic(folder / CONFIG, model.cfg.pretty_text + "\n")]


def _known_dataset_meta(num_classes: int) -> dict | None:
    """Cityscapes' classes and palette for a 19-class model (what mmseg's init_model guesses)."""
    from mmseg.datasets import CityscapesDataset

    meta = CityscapesDataset.METAINFO
    return dict(meta) if len(meta["classes"]) == num_classes else None


def init_pruned_model(config: str | Path, checkpoint: str | Path, device: str = "cpu") -> nn.Module:
    """mmseg's `init_model` for a pruned checkpoint: the config's `EncoderDecoder`, every
    layer resized to the checkpoint's shapes (`resize_to`), the weights loaded strictly with
    mmengine's `load_checkpoint`; `cfg` and `dataset_meta` set as `init_model` sets them, so
    `mmseg.apis.inference_model` works on the result. The config file is Python (trust it)."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.runner import load_checkpoint
    from mmseg.apis import init_model

    from cswap.files import load_checkpoint as read_state

    cfg = load_config(config)
    with _registered_types_only():
        segmentor = revert_sync_batchnorm(init_model(cfg, checkpoint=None, device="cpu"))
    resize_to(segmentor, read_state(checkpoint))
    loaded = load_checkpoint(segmentor, str(checkpoint), map_location="cpu", strict=True)
    segmentor.dataset_meta = loaded.get("meta", {}).get("dataset_meta")
    segmentor.cfg = cfg
    return segmentor.to(device).eval()


def resize_to(model: nn.Module, state: dict) -> None:
    """Give each convolution, linear and batch-norm layer of `model` the shapes its entries in
    `state` have (what structured pruning changed), fixing the attributes its forward reads
    (in/out channels, features); the values are then loaded from `state`."""
    own = model.state_dict()
    changed = {k.rpartition(".")[0] for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)}
    for name in sorted(changed):
        module = model.get_submodule(name)
        _resize_module(module, {k.rpartition(".")[2]: v for k, v in state.items() if k.rpartition(".")[0] == name}, name)


def _resize_module(module: nn.Module, entries: dict, name: str) -> None:
    from torch.nn.modules.batchnorm import _NormBase
    from torch.nn.modules.conv import _ConvNd

    for key, value in entries.items():
        if key in module._parameters and module._parameters[key] is not None:
            module._parameters[key] = nn.Parameter(torch.empty_like(value, dtype=module._parameters[key].dtype),
                                                   requires_grad=module._parameters[key].requires_grad)
        elif key in module._buffers and module._buffers[key] is not None and value.dim() > 0:
            module._buffers[key] = torch.empty_like(value, dtype=module._buffers[key].dtype)
    weight = entries.get("weight")
    if isinstance(module, _ConvNd) and weight is not None:
        if module.groups not in (1, module.in_channels):
            raise ConfigError(f"cannot resize grouped convolution {name} (groups={module.groups})")
        depthwise = module.groups > 1
        module.out_channels = weight.shape[0]
        module.in_channels = weight.shape[0] if depthwise else weight.shape[1]
        module.groups = module.in_channels if depthwise else 1
    elif isinstance(module, nn.Linear) and weight is not None:
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, _NormBase):
        module.num_features = entries.get("weight", entries.get("running_mean")).shape[0]
    elif weight is not None or entries:
        raise ConfigError(f"cannot resize {type(module).__name__} {name} to the checkpoint's shapes")
