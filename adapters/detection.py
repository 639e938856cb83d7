"""torchvision RetinaNet / FCOS (as `cswap.models.detection.DenseDetector`): units, protected
predictors, stage chain.

Units are the channels of torch-pruning's dependency groups in the backbone, the FPN and
the heads' conv towers. What tracing couples here, measured on `tiny_retinanet`:
- the FPN's output channels are ONE group across all pyramid levels, with the first conv
  of both head towers: the head is shared by the levels, so channel c of P3..P7 is read by
  the same weight slice and can only go together (the max-pool / P6-P7 extra levels are
  computed from P5 or C5 and join the same group or their own);
- the FPN's lateral (inner) convs form one group too (top-down additions couple them);
- every backbone conv whose output is not added to anything is its own group.

Never pruned: the final predictors (`cls_logits`, `bbox_reg`, FCOS `bbox_ctrness`); their
output channels are (anchor, class) and (anchor, coordinate) slots. They are passed to
torch-pruning as ignored layers, which is also what keeps tracing fast: otherwise
torch-pruning follows their channels through the reshape/concat of every pyramid level
into the (N, anchors, classes) output and its index mapping runs for minutes.

Where zeroing != removal the core skips the group with the reason: FCOS and RetinaNet v2
heads normalise their towers with GroupNorm, so those tower convs are not units (the
backbone and FPN still are).

The tracing covers the whole wrapper (backbone + FPN + head + box decoding), which is
possible because `DenseDetector` has no data-dependent selection (NMS, top-k) in its
forward; see `models/detection.py`.

`stages` cuts the forward into normalisation + each backbone stage, the FPN, and the head
with box decoding; a cut in the head re-runs only the head.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import BackboneWithFPN

from cswap.adapters.generic import GenericAdapter

_PREDICTORS = ("head.classification_head.cls_logits", "head.regression_head.bbox_reg",
               "head.regression_head.bbox_ctrness")


def _is_dense_detector(model: nn.Module) -> bool:
    return type(model).__name__ == "DenseDetector" and hasattr(model, "head") and hasattr(model, "backbone")


class _BodyStage(nn.Module):
    """One child of the backbone's IntermediateLayerGetter; carries (image, h, features)."""

    def __init__(self, model: nn.Module, name: str, first: bool):
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: a stage owns only the modules it runs
        self.name, self.first = name, first
        self.layer = model.backbone.body[name]
        self.out_name = model.backbone.body.return_layers.get(name)

    def forward(self, state):
        if self.first:
            x = self.model.normalise(state)
            h, features = x, ()
        else:
            x, h, features = state
        h = self.layer(h)
        if self.out_name is not None:
            features = features + ((self.out_name, h),)
        return x, h, features


class _FpnStage(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.fpn = model.backbone.fpn

    def forward(self, state):
        x, _, features = state
        return x, list(self.fpn(OrderedDict(features)).values())


class _HeadStage(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.head = model.head
        self.__dict__["model"] = model  # for `dense` (box decoding, no parameters)

    def forward(self, state):
        x, features = state
        return self.model.dense(self.head(features), features, x)


class DetectionAdapter(GenericAdapter):
    name = "detection"
    priority = 10

    def matches(self, model: nn.Module) -> bool:
        return _is_dense_detector(model)

    def ignored_layers(self, model: nn.Module) -> list[nn.Module]:
        modules = dict(model.named_modules())
        return [modules[n] for n in _PREDICTORS if n in modules] + super().ignored_layers(model)

    def units(self, model: nn.Module, example_inputs: torch.Tensor):
        graph = super().units(model, example_inputs)
        names = dict(model.named_modules())
        for name in _PREDICTORS:
            if name in names:
                graph.skipped.setdefault(name, "final predictor: its output channels are anchor x class/box "
                                               "slots (detection adapter)")
        return graph

    def stages(self, model: nn.Module) -> list[nn.Module] | None:
        backbone = model.backbone
        if not (isinstance(backbone, BackboneWithFPN) and isinstance(backbone.body, IntermediateLayerGetter)):
            return None  # an unknown backbone: full forward passes
        names = list(backbone.body.keys())
        body = [_BodyStage(model, n, i == 0) for i, n in enumerate(names)]
        return body + [_FpnStage(model), _HeadStage(model)]
