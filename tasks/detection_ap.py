"""Average precision for box detection (VOC all-point interpolation), small and tested.

Why our own: torchmetrics' `MeanAveragePrecision` needs pycocotools or faster-coco-eval as
a backend, three packages for ~60 lines; this module is checked against hand-computed
cases in tests/test_detection.py.

Rule (PASCAL VOC 2010+): per class, detections of all images sorted by score (descending,
stable); a detection is a true positive when its best-IoU ground-truth box of that class in
its image has IoU >= t and was not matched by a higher-scoring detection, else a false
positive. AP is the area under the precision envelope (all-point interpolation). Classes
without ground truth are left out of the mean. `mAP` averages AP over the IoU thresholds
0.50:0.05:0.95 (COCO's averaging, VOC's matching and interpolation: close to, but not
identical with, pycocotools' 101-point numbers).
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou

COCO_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.96, 0.05), 2).tolist())


def average_precision(detections: list[dict], ground_truth: list[tuple[torch.Tensor, torch.Tensor]],
                      num_classes: int, iou_thresholds=COCO_THRESHOLDS) -> dict[str, float]:
    """`detections[i]`: dict of boxes (D, 4), scores (D,), labels (D,) for image i;
    `ground_truth[i]`: (boxes (G, 4), labels (G,)). Returns mAP50, mAP and AP50 per class."""
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} detection lists for {len(ground_truth)} images")
    ious = [box_iou(gt_boxes.double().cpu(), det["boxes"].double().cpu()).numpy()
            for det, (gt_boxes, _) in zip(detections, ground_truth)]
    ap = {t: {} for t in iou_thresholds}
    for k in range(num_classes):
        gt_masks = [(labels.cpu().numpy() == k) for _, labels in ground_truth]
        npos = int(sum(m.sum() for m in gt_masks))
        if npos == 0:
            continue
        entries = []  # (score, image, detection index)
        for i, det in enumerate(detections):
            scores, labels = det["scores"].cpu().numpy(), det["labels"].cpu().numpy()
            entries += [(float(scores[d]), i, d) for d in np.flatnonzero(labels == k)]
        entries.sort(key=lambda e: -e[0])  # stable: ties keep image order
        for t in iou_thresholds:
            ap[t][k] = _class_ap(entries, ious, gt_masks, npos, t)
    mean = {t: float(np.mean(list(v.values()))) if v else 0.0 for t, v in ap.items()}
    out = {"mAP": float(np.mean(list(mean.values())))}
    if 0.5 in ap:
        out["mAP50"] = mean[0.5]
        out.update({f"AP50_class{k}": v for k, v in sorted(ap[0.5].items())})
    return out


def _class_ap(entries, ious, gt_masks, npos: int, threshold: float) -> float:
    matched = [np.zeros(len(m), dtype=bool) for m in gt_masks]
    tp = np.zeros(len(entries))
    for n, (_, i, d) in enumerate(entries):
        candidates = np.flatnonzero(gt_masks[i])
        if len(candidates) == 0:
            continue
        overlaps = ious[i][candidates, d]
        best = int(np.argmax(overlaps))
        if overlaps[best] >= threshold and not matched[i][candidates[best]]:
            matched[i][candidates[best]] = True
            tp[n] = 1
    return voc_ap(tp, npos)


def voc_ap(tp: np.ndarray, npos: int) -> float:
    """Area under the precision envelope for a score-sorted list of true-positive flags."""
    if len(tp) == 0:
        return 0.0
    ctp = np.cumsum(tp)
    recall = ctp / npos
    precision = ctp / np.arange(1, len(tp) + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))
