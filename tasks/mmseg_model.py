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

OpenMMLab checkpoints saved by a training run may also hold pickled training state
(`message_hub`, optimizer), which `weights_only` loading refuses; either set
`model.allow_pickle: true` for a checkpoint you trust, or save its `state_dict` once:
`torch.save(torch.load(p, weights_only=False)["state_dict"], "weights.pt")`.
"""
from __future__ import annotations

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


def load_config(config: str | Path, cfg_options: dict | None = None):
    """The mmengine Config of `config` (see `resolve_config`), with `cfg_options` merged."""
    mmcv_bridge.install()
    from mmengine import Config

    cfg = Config.fromfile(str(resolve_config(config)))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


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
    segmentor = revert_sync_batchnorm(init_model(cfg, checkpoint=None, device="cpu"))
    return SegLogits(segmentor).eval()
