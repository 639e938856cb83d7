"""DDRNet (mmsegmentation) wrapped as `SegLogits`: units, protected head, stage chain.

Units come from torch-pruning's dependency groups on mmseg's DDRNet, which couples what the
bilateral design couples: the spatial (high-resolution) branch's residual stream is one
group with `compression_1`/`compression_2` (whose outputs are added into it) and the
`down_*` inputs; each context-branch stream is one group with the `down_*` convolution
that is added into it; every block's inner convolution is its own group, and so are DAPPM's
branches. Measured on DDRNet-23-slim (random init, randomised BN, 1x3x64x128): 30 groups,
3,840 units, cutting == physical removal to 1.5e-13 in float64 for every group at once, and
to float32 round-off (about 1e-6 of the output scale) one group at a time.

Never pruned: the decode head's classifier `decode_head.conv_seg` (its channels are the
classes; the core also protects it because it reaches the output) and the training-only
auxiliary classifier. The training-only `aux_head` is not run in eval, so discovery reports
it as unused.

`stages` cuts the forward into stem, stage 3, stage 4, stage 5 (+DAPPM) and head, passing
the two branches along as a tuple; applying them in sequence equals the model (tested).
The stages add out of place, unlike mmseg's forward (`x_c += ...`), so an engine may cache
a stage's output and rerun the next stages on it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cswap.adapters.generic import GenericAdapter


def _is_ddrnet_wrapper(model: nn.Module) -> bool:
    # by name, so `adapter: auto` on other models never imports mmseg
    return (type(model).__name__ == "SegLogits" and type(getattr(model, "backbone", None)).__name__ == "DDRNet"
            and not hasattr(model, "neck"))


class _Stem(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor):
        size = images.shape[-2:]
        return self.backbone.stem(images), (size[0] // 8, size[1] // 8), size


class _Bilateral(nn.Module):
    """DDRNet stage 3 (i=0) or 4 (i=1): both branches, then the two-way fusion."""

    def __init__(self, backbone: nn.Module, i: int):
        super().__init__()
        self.backbone, self.i = backbone, i

    def forward(self, state):
        b, i = self.backbone, self.i
        if i == 0:
            x, out_size, size = state
            x_c, x_s = b.context_branch_layers[0](x), b.spatial_branch_layers[0](x)
        else:
            x_s, x_c, out_size, size = state
            x_c = b.context_branch_layers[1](b.relu(x_c))
            x_s = b.spatial_branch_layers[1](b.relu(x_s))
        compression, down = (b.compression_1, b.down_1) if i == 0 else (b.compression_2, b.down_2)
        comp_c = compression(b.relu(x_c))
        x_c = x_c + down(b.relu(x_s))
        x_s = x_s + F.interpolate(comp_c, size=out_size, mode="bilinear", align_corners=b.align_corners)
        return x_s, x_c, out_size, size


class _Stage5(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, state):
        b = self.backbone
        x_s, x_c, out_size, size = state
        x_s = b.spatial_branch_layers[2](b.relu(x_s))
        x_c = b.spp(b.context_branch_layers[2](b.relu(x_c)))
        x_c = F.interpolate(x_c, size=out_size, mode="bilinear", align_corners=b.align_corners)
        return x_s + x_c, size


class _Head(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.decode_head = model.decode_head
        self.align_corners = model.align_corners

    def forward(self, state):
        features, size = state
        logits = self.decode_head(features)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=self.align_corners)
        return logits


class DDRNetAdapter(GenericAdapter):
    name = "ddrnet"
    priority = 10

    def matches(self, model: nn.Module) -> bool:
        return _is_ddrnet_wrapper(model)

    def ignored_layers(self, model: nn.Module) -> list[nn.Module]:
        head = model.decode_head
        fixed = [head.conv_seg] + ([head.aux_cls_seg] if hasattr(head, "aux_cls_seg") else [])
        return fixed + super().ignored_layers(model)

    def units(self, model: nn.Module, example_inputs: torch.Tensor):
        """Discovery as usual; the protected classifiers are listed with the reason, so
        `--dry-run` and the plan say why they are absent."""
        graph = super().units(model, example_inputs)
        for name in ("decode_head.conv_seg", "decode_head.aux_cls_seg"):
            if name in dict(model.named_modules()):
                graph.skipped.setdefault(name, "classifier: its output channels are the classes (ddrnet adapter)")
        return graph

    def stages(self, model: nn.Module) -> list[nn.Module]:
        b = model.backbone
        return [_Stem(b), _Bilateral(b, 0), _Bilateral(b, 1), _Stage5(b), _Head(model)]
