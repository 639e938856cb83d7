"""sigma for semantic segmentation: IoU per image, per class present or per region (paper §4.6).

The paper's sigma_seg is the mean Intersection-over-Union. A significance test needs paired
observations grouped for Definition 2's vote, and this scorer defines both:

- `voting: per_class` (default): one observation per (image, class present in the image's
  ground truth), the IoU of that class in that image, grouped by class. A unit is then
  critical when removing it significantly changes some class's IoU, the segmentation analogue
  of the per-class vote of classification.
- `voting: per_region`: each image is cut into a `grid` of rows x columns regions; one
  observation per (image, region with labelled pixels), the mean IoU over the classes
  present in that region (IoU computed on that region's pixels), grouped by region index
  (row-major). A unit is critical when it significantly changes the segmentation somewhere
  in the frame (Cityscapes has a strong spatial layout: road below, sky above).

Either way the layout depends only on the targets, so the original and intervened networks'
observations pair up index by index. Because the scorer already defines the groups, the
significance test must vote over them: `paired_t` with `voting: per_class` ("per group";
`pooled` would ignore them).

Predictions are the argmax of the logits, pixels labelled `ignore_index` are left out.
`smooth` pixels are added to every intersection and union: an IoU of exactly 0 (a class
present but never predicted, common in a weak model) would make the paper's relative effect
(sigma* - sigma) / sigma unbounded, and one pixel of smoothing bounds it without
measurably changing the IoU of any class that covers more than a few hundred pixels.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from cswap.interfaces import Scores, ScoringFunction


class IoUScorer(ScoringFunction):
    higher_is_better = True

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        voting: Literal["per_class", "per_region"] = "per_class"
        grid: tuple[int, int] = Field((4, 4), description="per_region: rows and columns of regions")
        ignore_index: int = 255
        smooth: float = Field(1.0, ge=0, description="pixels added to intersection and union")

    @property
    def positive(self) -> bool:
        """IoU is in [0, 1]; `smooth` > 0 makes every value > 0 (the relative effect applies)."""
        return self.options.smooth > 0

    def __init__(self, options: "IoUScorer.Options | None" = None):
        super().__init__(options)
        rows, cols = self.options.grid
        if rows < 1 or cols < 1:
            raise ValueError(f"grid must be at least 1x1, got {self.options.grid}")

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> Scores:
        if isinstance(outputs, (tuple, list)):
            outputs = outputs[0]
        if outputs.dim() != 4 or targets.dim() != 3 or outputs.shape[-2:] != targets.shape[-2:]:
            raise ValueError(
                f"expected logits (N, C, H, W) and label maps (N, H, W) of the same size, "
                f"got {tuple(outputs.shape)} and {tuple(targets.shape)}"
            )
        pred = outputs.detach().argmax(1).cpu()
        target = targets.detach().cpu().long()
        if self.options.voting == "per_class":
            return self._per_class(pred, target, outputs.shape[1])
        return self._per_region(pred, target, outputs.shape[1])

    def _ious(self, pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """Per class of one image (or region): IoU and whether the class is in the ground truth."""
        valid = target != self.options.ignore_index
        p, t = pred[valid], target[valid]
        inter = torch.bincount(t[p == t], minlength=num_classes)[:num_classes].double()
        area_p = torch.bincount(p, minlength=num_classes)[:num_classes].double()
        area_t = torch.bincount(t, minlength=num_classes)[:num_classes].double()
        union = area_p + area_t - inter
        s = self.options.smooth
        iou = ((inter + s) / (union + s).clamp_min(1e-12)).numpy()
        return iou, area_t.numpy() > 0

    def _per_class(self, pred, target, num_classes: int) -> Scores:
        values, groups = [], []
        for i in range(pred.shape[0]):
            iou, present = self._ious(pred[i], target[i], num_classes)
            classes = np.flatnonzero(present)
            values.append(iou[classes])
            groups.append(classes)
        return Scores(np.concatenate(values).astype(np.float64), np.concatenate(groups).astype(np.int64))

    def _per_region(self, pred, target, num_classes: int) -> Scores:
        rows, cols = self.options.grid
        h, w = target.shape[-2:]
        ys = np.linspace(0, h, rows + 1).round().astype(int)
        xs = np.linspace(0, w, cols + 1).round().astype(int)
        values, groups = [], []
        for i in range(pred.shape[0]):
            for r in range(rows):
                for c in range(cols):
                    window = (i, slice(ys[r], ys[r + 1]), slice(xs[c], xs[c + 1]))
                    iou, present = self._ious(pred[window], target[window], num_classes)
                    if present.any():  # a region without labelled pixels gives no observation
                        values.append(float(iou[present].mean()))
                        groups.append(r * cols + c)
        return Scores(np.asarray(values, dtype=np.float64), np.asarray(groups, dtype=np.int64))
