"""sigma for detection: per (image, class present), how well the detector finds that class.

    match(g)      = max over predictions a of  IoU(box_a, g) * score_a[class(g)]
    sigma(i, k)   = floor + (1 - floor) * mean of match(g) over the ground-truth boxes g
                    of class k in image i

one observation per (image, class present in its ground truth), voting in the group of its
class, like the mIoU scorer's per-class voting for segmentation.

Why this is a sensible causal target:
- it is defined for every image and every class present, whatever the network predicts
  (an image where the class is missed scores `floor`, not "undefined"), and its layout
  depends only on the ground truth, so baseline and intervened observations pair up;
- it is bounded in [floor, 1] and rewards both localisation (IoU) and confidence (score):
  a unit whose removal shifts the boxes or lowers the right class's score lowers it;
- it is continuous in the network's outputs: it reads the dense output (every anchor,
  before thresholds and NMS, see `models/detection.py`), so a small change of a weight
  gives a small change of sigma, which is what a paired t-test on small effects needs. A
  score on the post-NMS list would jump when a box crosses the score threshold;
- `floor` (default 1e-3) keeps the paper's relative effect (sigma* - sigma) / sigma finite
  when a class is missed entirely.

What it does not see (documented weakness, also in docs/results/detection.md): false
positives. Raising the score of a wrong class on background anchors, or duplicating boxes,
does not lower sigma, while it lowers mAP. The max over anchors also makes sigma an upper
bound of what survives NMS. `false_positive_penalty` > 0 subtracts that share of the
highest score the image gives to classes absent from its ground truth (clipped at the
floor), for users who want the penalty; it is off by default to keep sigma a pure
per-class recall-quality measure whose groups are independent.

Targets: a (N, B, 5) float tensor per batch, rows (label, x1, y1, x2, y2), label -1 for
padding (the detection task's format). Outputs: the (N, A, 4 + C) dense detections.
"""
from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torchvision.ops import box_iou

from cswap.interfaces import Scores, ScoringFunction


class DetectionMatchScorer(ScoringFunction):
    higher_is_better = True

    @property
    def positive(self) -> bool:
        """sigma is in [floor, 1]: positive when `floor` > 0 (the default)."""
        return self.options.floor > 0

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        floor: float = Field(1e-3, ge=0, lt=1, description="sigma of a missed class (keeps relative effects finite)")
        false_positive_penalty: float = Field(0.0, ge=0, le=1, description="subtract this share of the top score "
                                                                          "of a class absent from the image")

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> Scores:
        outputs, targets = _check(outputs, targets)
        num_classes = outputs.shape[-1] - 4
        values, groups = [], []
        for det, gt in zip(outputs.detach().double().cpu(), targets.detach().double().cpu()):
            gt = gt[gt[:, 0] >= 0]
            labels = gt[:, 0].long()
            if len(gt) and int(labels.max()) >= num_classes:
                raise ValueError(f"a ground-truth label {int(labels.max())} is not below the model's "
                                 f"{num_classes} classes")
            boxes, scores = det[:, :4], det[:, 4:]
            iou = box_iou(gt[:, 1:], boxes)  # (G, A)
            match = (iou * scores[:, labels].T).amax(dim=1) if len(boxes) else torch.zeros(len(gt), dtype=torch.float64)
            penalty = 0.0
            if self.options.false_positive_penalty > 0:
                absent = torch.ones(num_classes, dtype=torch.bool)
                absent[labels] = False
                if absent.any():
                    penalty = self.options.false_positive_penalty * float(scores[:, absent].max())
            f = self.options.floor
            for k in torch.unique(labels).tolist():  # ascending: the layout depends on the targets only
                quality = max(float(match[labels == k].mean()) - penalty, 0.0)
                values.append(f + (1 - f) * quality)
                groups.append(k)
        return Scores(np.asarray(values, dtype=np.float64), np.asarray(groups, dtype=np.int64))


def _check(outputs, targets) -> tuple[torch.Tensor, torch.Tensor]:
    if not torch.is_tensor(outputs) or outputs.dim() != 3 or outputs.shape[-1] < 5:
        shape = tuple(outputs.shape) if torch.is_tensor(outputs) else type(outputs).__name__
        raise ValueError(f"expected dense detections (N, anchors, 4 + classes) from a DenseDetector, got {shape}")
    if not torch.is_tensor(targets) or targets.dim() != 3 or targets.shape[-1] != 5:
        shape = tuple(targets.shape) if torch.is_tensor(targets) else type(targets).__name__
        raise ValueError(f"expected targets (N, boxes, 5) rows (label, x1, y1, x2, y2), got {shape}")
    if len(outputs) != len(targets):
        raise ValueError(f"{len(outputs)} outputs for {len(targets)} targets")
    return outputs, targets
