"""Object detection: the sample set S, mAP, and the `detection_match` scorer by default.

Data (`format`): COCO-format annotations and images (`tasks/coco.py`: a folder with
`annotations/instances_<split>.json` and `<split>/` images, read as RGB), or one local `.npz`
file (no downloads) holding, per split,
- `<split>_images`: (N, H, W) or (N, H, W, C) uint8, all images of a split the same size;
- `<split>_boxes`:  (N, B, 4) float, x1, y1, x2, y2 in pixels, rows beyond an image's
  objects are padding;
- `<split>_labels`: (N, B) int, class index per box, -1 on padding rows;
- optionally `classes`: the class names.
`tasks/detection_scenes.py` writes such files (Fashion-MNIST items or shapes on a canvas).

Model: a `DenseDetector` (models/detection.py): images in [0, 1] in, dense
detections (N, anchors, 4 + classes) out; evaluation applies its torchvision-equivalent
post-processing (threshold, top-k, NMS) and measures mAP with `tasks.detection_ap`.

Targets in S are one (N, B, 5) float tensor per batch, rows (label, x1, y1, x2, y2), padded
with label -1 to the largest object count of S, so batches concatenate (the pruner
re-batches S after an out-of-memory error).

Manifold rule (seeded, drawn from `manifold_split`, disjoint from the evaluation split): the
images of the split (or a seeded subset of `max_candidates`) are put in a seeded random
order; classes are visited from the rarest (fewest images) to the most frequent, and for
each the next images containing it are added until it appears in `samples_per_class` (M_k)
images of S. Every class thus appears in >= M_k images (frequent classes in more, since an
image brings all its objects). A class in fewer than M_k images is an error naming it; a
class in no image at all is left out with a warning.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from cswap.errors import DataError
from cswap.interfaces import Manifold

from .detection_ap import average_precision
from .sample_set import SampleSetOptions, SampleSetTask

log = logging.getLogger("cswap")


class DetectionTask(SampleSetTask):
    default_scorer = "detection_match"
    default_test = "paired_t"
    metric = "mAP50"

    class Options(SampleSetOptions):
        root: Path = Field(description="format npz: the .npz file (see the module docstring for its arrays); "
                           "format coco: the folder holding annotations/ and one image folder per split")
        format: Literal["npz", "coco"] = Field("npz", description="how the data is stored (module docstring)")
        image_size: tuple[int, int] | None = Field(
            None, description="format coco: resize every image to (H, W), boxes alike (needed when sizes differ)")
        labels: Literal["contiguous", "category_id"] = Field(
            "contiguous", description="format coco: labels 0..K-1 in category-id order, or the category ids "
            "(torchvision's COCO-trained detectors)")
        samples_per_class: int = Field(8, ge=2, description="M_k: images of S in which each class appears")
        max_candidates: int | None = Field(None, ge=1, description="draw S from a seeded subset of this many images")
        batch_size: int = Field(16, ge=1)
        to_rgb: bool = Field(False, description="repeat grayscale images to 3 channels (ImageNet backbones)")

        @model_validator(mode="after")
        def _coco_options(self):
            if self.format == "npz" and (self.image_size is not None or self.labels != "contiguous"):
                raise ValueError("image_size and labels are options of format coco")
            if self.image_size is not None and min(self.image_size) < 1:
                raise ValueError(f"image_size must be two positive sizes (H, W), got {self.image_size}")
            return self

    def __init__(self, options: "DetectionTask.Options"):
        super().__init__(options)
        if options.format == "npz" and not Path(options.root).is_file():
            raise DataError(f"detection data file {options.root} does not exist (task option root)")
        if options.format == "coco" and not Path(options.root).is_dir():
            raise DataError(f"COCO folder {options.root} does not exist (task option root)")
        self._data = None
        self._coco: dict = {}  # split -> CocoSplit

    # ---- data ----------------------------------------------------------------------------
    def _arrays(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.options.format == "coco":
            return self._coco_arrays(split)
        if self._data is None:
            self._data = np.load(self.options.root, allow_pickle=False)
        keys = [f"{split}_{k}" for k in ("images", "boxes", "labels")]
        missing = [k for k in keys if k not in self._data.files]
        if missing:
            raise DataError(f"{self.options.root} lacks {missing}; it has {sorted(self._data.files)}")
        images, boxes, labels = (self._data[k] for k in keys)
        consistent = len(images) == len(boxes) == len(labels) and boxes.shape[:2] == labels.shape
        if not consistent or boxes.shape[-1:] != (4,):
            raise DataError(f"split {split!r}: images {images.shape}, boxes {boxes.shape} and labels {labels.shape} "
                            "do not fit (expected N images, (N, B, 4) boxes, (N, B) labels)")
        return images, boxes.astype(np.float32), labels.astype(np.int64)

    def _coco_arrays(self, split: str):
        """A COCO-format split (`tasks/coco.py`), read once; every split must list the same categories."""
        if split not in self._coco:
            from .coco import read_coco_split

            o = self.options
            self._coco[split] = read_coco_split(o.root, split, image_size=o.image_size, labels=o.labels)
            other = next((s for name, s in self._coco.items() if name != split), None)
            if other is not None and other.classes != self._coco[split].classes:
                raise DataError(f"the COCO splits of {o.root} list different categories: {split!r} has "
                                f"{self._coco[split].classes}, another split {other.classes}")
        data = self._coco[split]
        return data.images, data.boxes, data.labels

    @property
    def class_names(self) -> list[str] | None:
        self._arrays(self.options.manifold_split)
        if self.options.format == "coco":
            return list(self._coco[self.options.manifold_split].classes)
        return [str(c) for c in self._data["classes"]] if "classes" in self._data.files else None

    def class_count(self) -> int:
        """Classes of the data (0..n-1: the named ones, and any label beyond). Not
        `Task.num_classes`: a detector's output width is not its class count, so the core's
        coverage check does not apply (S warns of absent classes)."""
        splits = (self.options.manifold_split, self.options.eval_split)
        labels = np.concatenate([self._arrays(s)[2].ravel() for s in splits])
        return max(int(labels.max()) + 1, len(self.class_names or []))

    def images(self, split: str, idx) -> torch.Tensor:
        """Images `idx` of `split` as floats in [0, 1], (n, C, H, W)."""
        x = torch.from_numpy(np.ascontiguousarray(self._arrays(split)[0][np.asarray(idx)])).float() / 255.0
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        if self.options.to_rgb and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x.contiguous()

    def targets(self, split: str, idx, width: int) -> torch.Tensor:
        """(n, width, 5) rows (label, x1, y1, x2, y2), objects first, label -1 on padding."""
        _, boxes, labels = self._arrays(split)
        out = torch.zeros(len(idx), width, 5)
        out[:, :, 0] = -1
        for row, i in enumerate(idx):
            keep = labels[i] >= 0
            n = int(keep.sum())
            out[row, :n, 0] = torch.from_numpy(labels[i][keep]).float()
            out[row, :n, 1:] = torch.from_numpy(boxes[i][keep])
        return out

    # ---- Task interface -------------------------------------------------------------------
    def manifold(self, seed: int, samples_per_class: int | None = None) -> Manifold:
        o, per_class = self.options, self.per_class(samples_per_class)
        _, _, labels = self._arrays(o.manifold_split)
        rng = np.random.default_rng(seed)
        candidates = rng.permutation(len(labels))
        if o.max_candidates is not None:
            candidates = candidates[: o.max_candidates]
        present = {int(i): set(labels[i][labels[i] >= 0].tolist()) for i in candidates}
        frequency: dict[int, int] = {}
        for classes in present.values():
            for k in classes:
                frequency[k] = frequency.get(k, 0) + 1
        names = self.class_names
        unnamed = {k for k, name in enumerate(names or []) if not name}  # gaps between COCO category ids
        absent = [k for k in range(self.class_count()) if k not in frequency and k not in unnamed]
        if absent:
            msg = f"classes {absent} appear in no image of split {o.manifold_split!r}; they get no observations"
            warnings.warn(msg)
            log.warning(msg)
        chosen: list[int] = []
        taken: set[int] = set()
        counts = {k: 0 for k in frequency}
        for k in sorted(frequency, key=lambda c: (frequency[c], c)):
            if frequency[k] < per_class:
                name = f" ({names[k]})" if names and k < len(names) else ""
                raise DataError(f"class {k}{name} appears in {frequency[k]} images of split {o.manifold_split!r}, "
                                f"fewer than samples_per_class={per_class}")
            for i in candidates:
                if counts[k] >= per_class:
                    break
                if k in present[int(i)] and int(i) not in taken:
                    chosen.append(int(i))
                    taken.add(int(i))
                    for c in present[int(i)]:
                        counts[c] += 1
        chosen.sort()
        width = max([1] + [int((labels[i] >= 0).sum()) for i in chosen])  # objects of the fullest image
        batches = [(self.images(o.manifold_split, chosen[i:i + o.batch_size]),
                    self.targets(o.manifold_split, chosen[i:i + o.batch_size], width))
                   for i in range(0, len(chosen), o.batch_size)]
        return Manifold(batches, counts)

    @torch.no_grad()
    def detections(self, model: nn.Module, device="cpu") -> tuple[list[dict], list[tuple[torch.Tensor, torch.Tensor]]]:
        """The model's post-processed detections on the evaluation split, and the ground truth."""
        if not hasattr(model, "postprocess"):
            raise TypeError(f"the detection task needs a DenseDetector (models/detection.py), "
                            f"got {type(model).__name__}")
        split = self.options.eval_split
        idx = self.eval_indices(len(self._arrays(split)[0]))
        _, boxes, labels = self._arrays(split)
        was_training = model.training
        model.eval()
        detections = []
        try:
            for i in range(0, len(idx), self.options.batch_size):
                x = self.images(split, idx[i:i + self.options.batch_size]).to(device)
                detections += [{k: v.cpu() for k, v in d.items()}
                               for d in model.postprocess(model(x), model.level_sizes(tuple(x.shape[-2:])))]
        finally:
            model.train(was_training)
        truth = [(torch.from_numpy(boxes[i][labels[i] >= 0]), torch.from_numpy(labels[i][labels[i] >= 0])) for i in idx]
        return detections, truth

    def evaluate(self, model: nn.Module, device: torch.device | str = "cpu") -> dict[str, float]:
        detections, truth = self.detections(model, device)
        metrics = average_precision(detections, truth, self.class_count())
        return {**metrics, "eval_samples": len(truth)}

    def example_inputs(self) -> torch.Tensor:
        return self.images(self.options.eval_split, [0])
