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

What a config can run: nothing that is not trusted. Configs are read by
`models/mmseg_config.py` (YAML and JSON as data; a `.py` only when it ships inside mmseg, or
under the user's `--trust-python-config`), and every `type` they name is checked before
anything is built. The pruned model's config is written as JSON data (`save_mmseg_checkpoint`),
so a run directory reloads without executing anything, and stock mmseg refuses it loudly
instead of building the unpruned widths.

OpenMMLab checkpoints saved by a training run may also hold pickled training state
(`message_hub`, optimizer), which `weights_only` loading refuses; either set
`model.allow_pickle: true` for a checkpoint you trust, or save its `state_dict` once:
`torch.save(torch.load(p, weights_only=False)["state_dict"], "weights.pt")`.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cswap.errors import ConfigError, CSwapError, ModelError, one_line

from . import mmcv_bridge
from .mmseg_config import (  # noqa: F401  (load_config, resolve_config: re-exported, the family's public names)
    PRUNED_FORMAT, PRUNED_KEY, REBUILD, REFUSED_TYPE, check_segmentor, load_config, registered_types_only,
    resolve_config,
)

if importlib.util.find_spec("mmcv") is not None:  # `import cswap.models.mmseg` makes `import mmseg.apis` work
    mmcv_bridge.install()


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
        self.data_settings: dict | None = None  # the run's data (root, split, scale): set by the segmentation task
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
    The config must be plain data (it is written beside the pruned model), checked here,
    before any analysis.
    """
    cfg = load_config(config, cfg_options)
    check_segmentor(cfg, str(config))
    plain_data(cfg.to_dict(), f"mmseg config {config}")
    return SegLogits(_build_segmentor(cfg, str(config)), cfg).eval()


def _build_segmentor(cfg, source: str) -> nn.Module:
    """mmseg's `init_model` on CPU, SyncBN reverted; whatever mmseg raises on the config's
    values (a width that is not a number, a head that does not fit its backbone) is one line."""
    mmcv_bridge.install()
    from mmengine.model import revert_sync_batchnorm
    from mmseg.apis import init_model

    try:
        with registered_types_only():
            return revert_sync_batchnorm(init_model(cfg, checkpoint=None, device="cpu"))
    except CSwapError:
        raise
    except Exception as exc:  # mmseg validates nothing up front: any error here is the config's values
        raise ModelError(f"mmseg cannot build the segmentor of {source}: {type(exc).__name__}: "
                         f"{one_line(exc)}") from exc


def input_normalisation(cfg) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(mean, std, bgr_to_rgb) of an mmseg config's `data_preprocessor`: what the segmentor
    expects its input images to be normalised with."""
    pre = cfg.get("data_preprocessor") or cfg.model.get("data_preprocessor") or {}
    mean = torch.tensor(pre.get("mean", [123.675, 116.28, 103.53]), dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(pre.get("std", [58.395, 57.12, 57.375]), dtype=torch.float32).view(1, -1, 1, 1)
    return mean, std, bool(pre.get("bgr_to_rgb", True))


# ---- back to mmseg: an mmseg checkpoint of a pruned model, and reading it ---------------------

CHECKPOINT, CONFIG = "mmseg_pruned.pth", "mmseg_config.json"


def save_mmseg_checkpoint(model: SegLogits, folder: Path) -> list[Path]:
    """`folder/mmseg_pruned.pth` ({"meta", "state_dict"}, as mmseg's own checkpoints, keys of
    the segmentor) and `folder/mmseg_config.json` (`pruned_config`). The pruned widths are the
    checkpoint's shapes: `init_pruned_model` builds the config's segmentor and gives every
    layer the checkpoint's shape before loading it."""
    import mmseg

    from cswap.files import save_state_dict_atomic, write_text_atomic

    if model.cfg is None:
        raise ConfigError("this SegLogits has no mmseg config to save (build it with build_mmseg_model)")
    segmentor = model.segmentor()
    meta = {"mmseg_version": mmseg.__version__, "pruned_by": "C-SWAP", "rebuild": REBUILD}
    dataset_meta = model.dataset_meta or _known_dataset_meta(model.num_classes)
    if dataset_meta:
        meta["dataset_meta"] = {k: list(v) if isinstance(v, tuple) else v for k, v in dataset_meta.items()}
    state = {k: v.detach().cpu() for k, v in segmentor.state_dict().items()}
    return [save_state_dict_atomic({"meta": meta, "state_dict": state}, folder / CHECKPOINT),
            write_text_atomic(folder / CONFIG, json.dumps(pruned_config(model), indent=1) + "\n")]


def pruned_config(model: SegLogits) -> dict:
    """The config written beside a pruned checkpoint, as JSON data (reloading executes
    nothing): the model's config, its evaluation data following the run (`follow_run`), and
    `model.type` replaced by a name no registry holds, so stock `mmseg.apis.init_model` fails
    with a message naming `init_pruned_model` instead of building the unpruned widths and
    loading the checkpoint around them. `init_pruned_model` restores the type."""
    data = plain_data(model.cfg.to_dict(), "the mmseg config")
    if getattr(model, "data_settings", None):
        follow_run(data, model.data_settings)
    data[PRUNED_KEY] = {"format": PRUNED_FORMAT, "model_type": data["model"]["type"], "rebuild": REBUILD}
    data["model"]["type"] = REFUSED_TYPE
    return data


def plain_data(value, where: str):
    """`value` as JSON data (tuples become lists); anything else (a class, a function in a
    trusted Python config) is refused, naming where it is."""
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where} has a key that is not text; it cannot be written as data")
        return {k: plain_data(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ConfigError(f"{where} holds {value!r}, which cannot be written as data (JSON) beside the pruned model; "
                      "use registered type names in the config")


def follow_run(data: dict, run: dict) -> None:
    """Point the written config's evaluation at the run's data: `data_root`, the evaluation
    split and the test pipeline's resize (the task's `scale`; none when it kept the size)."""
    data["data_root"] = run["data_root"]
    pipeline = data.get("test_pipeline")
    if isinstance(pipeline, list):
        pipeline = [step for step in pipeline if not (isinstance(step, dict) and step.get("type") == "Resize")]
        if run.get("scale") is not None:
            at = next((i + 1 for i, step in enumerate(pipeline)
                       if isinstance(step, dict) and step.get("type") == "LoadImageFromFile"), 0)
            pipeline.insert(at, {"type": "Resize", "scale": list(run["scale"]), "keep_ratio": True})
        data["test_pipeline"] = pipeline
    for key in ("val_dataloader", "test_dataloader"):
        dataset = data.get(key, {}).get("dataset") if isinstance(data.get(key), dict) else None
        if isinstance(dataset, dict):
            dataset.update(data_root=run["data_root"], data_prefix={"img_path": f"leftImg8bit/{run['split']}",
                                                                    "seg_map_path": f"gtFine/{run['split']}"})
            if isinstance(pipeline, list):
                dataset["pipeline"] = pipeline


def _known_dataset_meta(num_classes: int) -> dict | None:
    """Cityscapes' classes and palette for a 19-class model (what mmseg's init_model guesses)."""
    from mmseg.datasets import CityscapesDataset

    meta = CityscapesDataset.METAINFO
    return dict(meta) if len(meta["classes"]) == num_classes else None


def init_pruned_model(config: str | Path, checkpoint: str | Path, device: str = "cpu") -> nn.Module:
    """mmseg's `init_model` for a pruned checkpoint: the config's `EncoderDecoder`, every
    layer resized to the checkpoint's shapes (`resize_to`), the weights loaded strictly
    (`weights_only`); `cfg` and `dataset_meta` set as `init_model` sets them, so
    `mmseg.apis.inference_model` works on the result. The config is read as data (the
    `mmseg_config.json` C-SWAP writes), or as Python only where `cswap.trust` allows."""
    from cswap.files import load_checkpoint as read_state

    cfg = load_config(config)
    check_segmentor(cfg, str(config))
    segmentor = _build_segmentor(cfg, str(config))
    state = read_state(checkpoint)
    resize_to(segmentor, state)
    try:
        segmentor.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"checkpoint {checkpoint} does not fit the segmentor of {config}: {one_line(exc)}") from exc
    segmentor.dataset_meta = _checkpoint_meta(Path(checkpoint)).get("dataset_meta")
    segmentor.cfg = cfg
    return segmentor.to(device).eval()


def _checkpoint_meta(path: Path) -> dict:
    """The `meta` entry of an mmseg checkpoint (read with weights_only), or {}."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    meta = raw.get("meta") if isinstance(raw, dict) else None
    return meta if isinstance(meta, dict) else {}


def resize_to(model: nn.Module, state: dict) -> None:
    """Give each convolution, linear and batch-norm layer of `model` the shapes its entries in
    `state` have (what structured pruning changed), fixing the attributes its forward reads
    (in/out channels, features); the values are then loaded from `state`."""
    own = model.state_dict()
    changed = {k.rpartition(".")[0] for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)}
    for name in sorted(changed):
        module = model.get_submodule(name)
        own = {k.rpartition(".")[2]: v for k, v in state.items() if k.rpartition(".")[0] == name}
        _resize_module(module, own, name)


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
