"""torchvision single-stage detectors (RetinaNet, FCOS) as a model that returns one tensor.

Why a wrapper. torchvision's detectors return a list of dicts after score thresholding,
top-k and non-maximum suppression. Two things in the core need more than that: the run's
self-check compares the pruned and the intervened model's outputs as tensors (`a - b`),
and the causal test needs sigma to move continuously with the network, whereas NMS and
thresholds make a detection list jump when a score crosses a cut-off by 1e-7 (so
"intervention == removal" could not be checked to 1e-5 either). `DenseDetector` therefore
stops one step earlier, *before* any selection:

    forward(images) -> (N, A, 4 + C): for each of the A anchors (or FCOS locations), its
    decoded box (x1, y1, x2, y2 in input pixels, clipped to the image) and its C per-class
    scores in [0, 1] (RetinaNet: sigmoid(logit); FCOS: sqrt(sigmoid(logit) * sigmoid(ctr))).

Every operation here is continuous, so the output of the intervened model equals that of
the physically pruned one to round-off. The scores and boxes are exactly those that
torchvision's `postprocess_detections` selects from; `postprocess` below applies the same
threshold, top-k, NMS and per-image cap, and `detect` returns torchvision's list of dicts
(tested to match torchvision's own forward).

Parameter names are those of the torchvision detector (`backbone.*`, `head.*`), so a state
dict saved from `torchvision.models.detection.retinanet_resnet50_fpn(...)` loads as is.
Images go in as floats in [0, 1]; the wrapper normalises with the detector's mean and std
(torchvision's transform would also resize: here images keep their size).

Two-stage detectors (Faster R-CNN) are not wrapped: their second stage reads proposals
chosen by NMS and top-k *inside* the network, so no continuous dense output exists.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool


class DenseDetector(nn.Module):
    """Backbone + FPN + head of a torchvision RetinaNet or FCOS, returning dense detections."""

    def __init__(self, detector: RetinaNet | FCOS, score_thresh: float | None = None,
                 nms_thresh: float | None = None, detections_per_img: int | None = None,
                 topk_candidates: int | None = None):
        super().__init__()
        if not isinstance(detector, (RetinaNet, FCOS)):
            raise TypeError(f"DenseDetector wraps torchvision RetinaNet or FCOS, not {type(detector).__name__} "
                            "(two-stage detectors select proposals inside the network)")
        self.kind = "fcos" if isinstance(detector, FCOS) else "retinanet"
        self.backbone = detector.backbone
        self.head = detector.head
        self.anchor_generator = detector.anchor_generator
        self.box_coder = detector.box_coder  # no parameters
        self.num_classes = _num_classes(detector)
        transform = detector.transform
        # non-persistent: the state dict stays the torchvision detector's
        self.register_buffer("image_mean", torch.tensor(transform.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(transform.image_std).view(1, -1, 1, 1), persistent=False)
        self.score_thresh = detector.score_thresh if score_thresh is None else score_thresh
        self.nms_thresh = detector.nms_thresh if nms_thresh is None else nms_thresh
        self.detections_per_img = detector.detections_per_img if detections_per_img is None else detections_per_img
        self.topk_candidates = detector.topk_candidates if topk_candidates is None else topk_candidates
        self._anchors: dict = {}

    # ---- the tensor the pruner sees ---------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"expected an image batch (N, C, H, W), got shape {tuple(images.shape)}")
        x = self.normalise(images)
        features = list(self.backbone(x).values())
        return self.dense(self.head(features), features, x)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.image_mean) / self.image_std

    def dense(self, out: dict[str, torch.Tensor], features: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Decode the head's outputs `out` for every anchor. The anchors depend only on the
        sizes of the image batch `x` and of the feature maps. Continuous in `out`."""
        anchors = self._anchors_for(x, features)  # (A, 4), the same for every image
        size = tuple(x.shape[-2:])
        if self.kind == "retinanet":
            n, a = out["bbox_regression"].shape[:2]
            boxes = self.box_coder.decode_single(out["bbox_regression"].reshape(n * a, 4), anchors.repeat(n, 1))
            boxes = boxes.reshape(n, a, 4)
            scores = torch.sigmoid(out["cls_logits"])
        else:
            regression = out["bbox_regression"]
            boxes = self.box_coder.decode(regression, anchors.unsqueeze(0).expand_as(regression))
            scores = torch.sqrt(torch.sigmoid(out["cls_logits"]) * torch.sigmoid(out["bbox_ctrness"]))
        boxes = box_ops.clip_boxes_to_image(boxes, size)
        return torch.cat([boxes, scores], dim=-1)

    def _anchors_for(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """Anchors depend only on the image and feature-map sizes: computed once per size."""
        key = (tuple(x.shape[-2:]), tuple(tuple(f.shape[-2:]) for f in features), x.device, x.dtype)
        if key not in self._anchors:
            image_list = ImageList(x[:1], [tuple(x.shape[-2:])])
            self._anchors[key] = self.anchor_generator(image_list, [f[:1] for f in features])[0].detach()
        return self._anchors[key]

    def level_sizes(self, image_size: tuple[int, int]) -> list[int]:
        """Anchors per FPN level for images of `image_size` (torchvision selects top-k per level)."""
        with torch.no_grad():
            x = torch.zeros(1, self.image_mean.shape[1], *image_size, device=self.image_mean.device)
            features = list(self.backbone(x).values())
        per_location = self.anchor_generator.num_anchors_per_location()[0]
        return [f.shape[-2] * f.shape[-1] * per_location for f in features]

    # ---- detections, as torchvision returns them --------------------------------------------
    def postprocess(self, dense: torch.Tensor, level_sizes: list[int] | None = None) -> list[dict[str, torch.Tensor]]:
        """torchvision's selection on the dense output: score threshold and top-k per FPN
        level, class-wise NMS, at most `detections_per_img` per image."""
        level_sizes = level_sizes or [dense.shape[1]]
        results = []
        for det in dense:
            boxes, scores = det[:, :4], det[:, 4:]
            kept_boxes, kept_scores, kept_labels = [], [], []
            for lb, ls in zip(boxes.split(level_sizes), scores.split(level_sizes)):
                flat = ls.flatten()
                idx = torch.where(flat > self.score_thresh)[0]
                top, order = flat[idx].topk(min(self.topk_candidates, len(idx)))
                idx = idx[order]
                kept_boxes.append(lb[idx // self.num_classes])
                kept_scores.append(top)
                kept_labels.append(idx % self.num_classes)
            b, s, l = torch.cat(kept_boxes), torch.cat(kept_scores), torch.cat(kept_labels)
            keep = box_ops.batched_nms(b, s, l, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": b[keep], "scores": s[keep], "labels": l[keep]})
        return results

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections per image (boxes, scores, labels), like a torchvision detector in eval."""
        return self.postprocess(self(images), self.level_sizes(tuple(images.shape[-2:])))

    def torchvision_model(self) -> RetinaNet | FCOS:
        """A torchvision detector sharing this wrapper's modules (for training with
        torchvision's losses); its transform keeps the image size and normalises as here."""
        cls = FCOS if self.kind == "fcos" else RetinaNet
        model = cls(self.backbone, num_classes=self.num_classes, min_size=1, max_size=10**6,
                    image_mean=self.image_mean.flatten().tolist(), image_std=self.image_std.flatten().tolist(),
                    anchor_generator=self.anchor_generator, head=self.head, score_thresh=self.score_thresh,
                    nms_thresh=self.nms_thresh, detections_per_img=self.detections_per_img,
                    topk_candidates=self.topk_candidates)
        model.transform.resize = lambda image, target=None: (image, target)  # keep sizes exactly
        return model


def _num_classes(detector: RetinaNet | FCOS) -> int:
    return detector.head.classification_head.num_classes


# ---- builders registered under cswap.models ------------------------------------------------
def torchvision_detector(name: str = "retinanet_resnet50_fpn", num_classes: int = 91, **kwargs) -> DenseDetector:
    """A torchvision RetinaNet/FCOS by name, random weights (no download), as a DenseDetector.

    Load trained weights with the config's `model.weights` (a torchvision state dict).
    Note: with a pretrained backbone torchvision uses FrozenBatchNorm2d, which torch-pruning
    does not treat as a batch norm; build without `weights_backbone` (as here) to get
    nn.BatchNorm2d and load the weights into that.
    """
    wrapper_keys = ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates")
    wrapper = {k: kwargs.pop(k) for k in wrapper_keys if k in kwargs}
    detector = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes,
                                            **kwargs)
    return DenseDetector(detector, **wrapper)


class _TinyBody(nn.Sequential):
    """Five strided conv-BN-ReLU stages (strides 2..32); `layer2..4` feed the FPN."""

    def __init__(self, in_channels: int, width: int):
        widths = [width, 2 * width, 3 * width, 4 * width, 6 * width]
        layers, c = OrderedDict(), in_channels
        for i, w in enumerate(widths):
            layers["stem" if i == 0 else f"layer{i}"] = nn.Sequential(
                nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
            c = w
        super().__init__(layers)
        self.widths = widths


def tiny_retinanet(num_classes: int = 3, width: int = 8, fpn_channels: int = 16, in_channels: int = 3,
                   anchor_sizes: tuple[int, ...] = (12, 24, 48, 96), image_mean: list[float] | None = None,
                   image_std: list[float] | None = None, **wrapper) -> DenseDetector:
    """A torchvision RetinaNet on a small CNN (strides 8/16/32 + max-pool level) for tests
    and CPU benchmarks on small images: ~40k parameters at the defaults."""
    body = _TinyBody(in_channels, width)
    backbone = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, body.widths[2:],
                               fpn_channels, extra_blocks=LastLevelMaxPool())
    ratios = ((0.5, 1.0, 2.0),) * len(anchor_sizes)
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ratios)
    head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes)
    for branch in (head.classification_head, head.regression_head):
        for m in branch.conv.modules():  # torchvision's std 0.01 suits 256 channels; at 16 the
            if isinstance(m, nn.Conv2d):  # signal would shrink ~10x per conv: He init instead
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    detector = RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head,
                         image_mean=image_mean or [0.5] * in_channels, image_std=image_std or [0.25] * in_channels)
    return DenseDetector(detector, **wrapper)
