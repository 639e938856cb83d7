"""Semantic segmentation on Cityscapes through mmsegmentation: the sample set S and mIoU.

Data is read from a local Cityscapes root by mmseg's own `CityscapesDataset` and transforms
(`leftImg8bit/<split>/<city>/*_leftImg8bit.png`, `gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`,
ignore label 255), so what the model sees is what mmseg feeds it. The pipeline is
LoadImageFromFile, LoadAnnotations, Resize(`scale`, keep_ratio) on image *and* label map,
PackSegInputs; the images are then normalised with the mmseg config's `data_preprocessor`
(mean, std, BGR->RGB). At the default `scale` (2048, 1024) a Cityscapes frame keeps its
native size, which is mmseg's evaluation protocol; a smaller `scale` is the reduced-resolution
option (faster; the labels are resized with nearest neighbour and mIoU is measured at that
resolution, so it is not comparable with published full-resolution numbers).

mIoU is mmseg's `IoUMetric` over `eval_split` (reported as a fraction, like accuracy).

Manifold rule (S, seeded, disjoint from evaluation because it is drawn from `manifold_split`):
a class "appears" in an image when it has at least `min_pixels` pixels after resizing.
The candidate images (all of the split, or a seeded subset of `max_candidates`) are put in a
seeded random order; classes are visited from the rarest (fewest candidate images) to the
most frequent, and for each class the next candidates containing it are added until it
appears in `samples_per_class` (M_k) images of S. Every class present in the split thus
appears in at least M_k images of S (frequent classes such as road in many more, since an
image brings all its classes); a class present in fewer than M_k candidates is an error
naming it, a class absent from every candidate is left out with a warning (option
`missing_classes: error` refuses instead: pruning cannot see what it does to such a class).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from cswap.errors import DataError
from cswap.interfaces import Manifold

from ..models import mmcv_bridge
from ..models.mmseg import load_config
from .sample_set import SampleSetOptions, SampleSetTask, short_of

log = logging.getLogger("cswap")

DDRNET23S_CITYSCAPES = "ddrnet_23-slim_in1k-pre_2xb6-120k_cityscapes-1024x1024.py"
IGNORE_INDEX = 255  # Cityscapes' unlabelled pixels, as mmseg's LoadAnnotations and IoUMetric read them


class CityscapesSegmentationTask(SampleSetTask):
    default_scorer = "miou"
    default_test = "paired_t"
    metric = "mIoU"

    class Options(SampleSetOptions):
        root: Path = Field(description="Cityscapes root holding leftImg8bit/ and gtFine/")
        config: str | None = Field(None, description="mmseg config (path or shipped name) whose data_preprocessor "
                                   "normalises the images; default: the mmseg model's own (model.kwargs.config), "
                                   "or DDRNet-23-slim's when the task serves no mmseg model")
        eval_split: str = "val"
        samples_per_class: int = Field(8, ge=2, description="M_k: images of S in which each class appears")
        min_pixels: int = Field(1, ge=1, description="pixels a class needs in an image to count as present")
        max_candidates: int | None = Field(None, ge=1, description="draw S from a seeded subset of this many images")
        scale: tuple[int, int] | None = Field((2048, 1024), description="(width, height) for mmseg Resize with "
                                                "keep_ratio; smaller is the reduced-resolution option; null keeps size")
        batch_size: int = Field(4, ge=1)
        missing_classes: Literal["warn", "error"] = Field(
            "warn", description="a class of the dataset in no image of S: warn (Cityscapes subsets often lack "
                                "rare classes) or refuse")

    def __init__(self, options: "CityscapesSegmentationTask.Options"):
        super().__init__(options)
        self.missing_classes = options.missing_classes  # read by cswap.coverage
        self._datasets: dict = {}
        self._norm = None
        self._model_cfg = None  # the mmseg config of the model this task serves (bind_model)

    def bind_model(self, model: nn.Module) -> None:
        """Normalise as the mmseg model expects: its config's data_preprocessor, unless the
        task names a config of its own (then a different normalisation is a warning). The
        model also learns the run's data (`data_settings`: root, evaluation split, scale), so
        the mmseg config written beside it evaluates what this run evaluated."""
        from ..models.mmseg import SegLogits, input_normalisation

        if not isinstance(model, SegLogits) or model.cfg is None:
            return
        o = self.options
        model.data_settings = {"data_root": str(Path(o.root).resolve()), "split": o.eval_split,
                               "scale": list(o.scale) if o.scale is not None else None}
        self._model_cfg, self._norm = model.cfg, None
        if self.options.config is not None:
            theirs, ours = input_normalisation(model.cfg), self._normaliser()
            if not all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(theirs, ours)):
                log.warning("task.options.config %s normalises images differently from the model's mmseg config; "
                            "the task's is used (leave task.options.config unset to use the model's)",
                            self.options.config)

    # ---- data --------------------------------------------------------------------------
    def dataset(self, split: str):
        """mmseg's CityscapesDataset of `split` with the pipeline described above."""
        if split not in self._datasets:
            root = Path(self.options.root)
            for sub in (f"leftImg8bit/{split}", f"gtFine/{split}"):
                if not (root / sub).is_dir():
                    raise DataError(f"Cityscapes folder {root / sub} does not exist (task option root={root})")
            mmcv_bridge.install()
            from mmengine.registry import init_default_scope
            from mmseg.datasets import CityscapesDataset

            init_default_scope("mmseg")
            pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations")]
            if self.options.scale is not None:
                pipeline.append(dict(type="Resize", scale=tuple(self.options.scale), keep_ratio=True))
            pipeline.append(dict(type="PackSegInputs"))
            ds = CityscapesDataset(
                data_root=str(root),
                data_prefix=dict(img_path=f"leftImg8bit/{split}", seg_map_path=f"gtFine/{split}"),
                pipeline=pipeline, test_mode=False, serialize_data=False,
            )
            if len(ds) == 0:
                raise DataError(f"no *_leftImg8bit.png images with labelTrainIds maps under {root}/leftImg8bit/{split}")
            _check_label_maps(ds, root, split)
            self._datasets[split] = ds
        return self._datasets[split]

    def _normaliser(self):
        """(mean, std, bgr_to_rgb) of the data_preprocessor of the task's mmseg config, else of
        the bound model's, else of DDRNet-23-slim's Cityscapes config."""
        if self._norm is None:
            from ..models.mmseg import input_normalisation

            if self.options.config is not None:
                cfg = load_config(self.options.config)
            else:
                cfg = self._model_cfg if self._model_cfg is not None else load_config(DDRNET23S_CITYSCAPES)
            self._norm = input_normalisation(cfg)
        return self._norm

    def load(self, split: str, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (N, 3, H, W) float32 and label maps (N, H, W) int64, checked
        (`_check_items`, `_check_values`): a bad file is named before it reaches a score."""
        ds = self.dataset(split)
        indices = [int(i) for i in indices]
        items = [ds[i] for i in indices]
        _check_items(ds, indices, items, split)
        images = torch.stack([it["inputs"] for it in items]).float()
        mean, std, bgr_to_rgb = self._normaliser()
        if bgr_to_rgb and images.shape[1] == 3:
            images = images[:, [2, 1, 0]]
        images = ((images - mean) / std).contiguous()
        labels = torch.stack([it["data_samples"].gt_sem_seg.data[0] for it in items]).long()
        _check_values(ds, indices, images, labels, split)
        return images, labels

    @property
    def num_classes(self) -> int:
        """Cityscapes' 19 train ids: the dataset class's own metainfo, so it is known without
        the data (a dry run on another machine)."""
        mmcv_bridge.install()
        from mmseg.datasets import CityscapesDataset

        return len(CityscapesDataset.METAINFO["classes"])

    # ---- Task interface ----------------------------------------------------------------
    def manifold(self, seed: int, samples_per_class: int | None = None) -> Manifold:
        """S by the rule in the module docstring; batches of `batch_size` images."""
        o, per_class = self.options, self.per_class(samples_per_class)
        ds = self.dataset(o.manifold_split)
        classes = list(ds.metainfo["classes"])
        rng = np.random.default_rng(seed)
        candidates = np.arange(len(ds))
        if o.max_candidates is not None and o.max_candidates < len(ds):
            candidates = np.sort(rng.choice(len(ds), o.max_candidates, replace=False))
        present = np.stack([self._presence(ds, int(i), len(classes)) for i in candidates])
        order = rng.permutation(len(candidates))
        frequency = present.sum(0)
        chosen: list[int] = []
        taken = np.zeros(len(candidates), dtype=bool)
        absent = [f"{k} ({classes[k]})" for k in range(len(classes)) if frequency[k] == 0]
        if absent:
            warnings.warn(f"classes {', '.join(absent)} appear in no image of split {o.manifold_split!r}; "
                          "they have no group in S")
        for k in sorted(np.flatnonzero(frequency), key=lambda c: (frequency[c], c)):
            if frequency[k] < per_class:
                raise DataError(
                    f"class {k} ({classes[k]}) appears in {frequency[k]} images of split {o.manifold_split!r}"
                    f"{' (candidates)' if len(candidates) < len(ds) else ''}, fewer than "
                    f"samples_per_class={per_class}"
                )
            have = int(present[taken, k].sum())
            for j in order:
                if have >= per_class:
                    break
                if not taken[j] and present[j, k]:
                    taken[j] = True
                    chosen.append(j)
                    have += 1
        picked = candidates[np.sort(np.asarray(chosen, dtype=np.int64))]
        counts = {int(k): int(n) for k, n in enumerate(present[taken].sum(0)) if n > 0}
        log.info("S: %d images; images per class %s", len(picked), counts)
        batches = [self.load(o.manifold_split, picked[i:i + o.batch_size]) for i in range(0, len(picked), o.batch_size)]
        return Manifold(batches, counts, picked)

    def _presence(self, ds, index: int, num_classes: int) -> np.ndarray:
        label = ds[index]["data_samples"].gt_sem_seg.data[0].numpy().ravel()
        label = label[label < num_classes]
        return np.bincount(label, minlength=num_classes)[:num_classes] >= self.options.min_pixels

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device | str = "cpu") -> dict[str, float]:
        """mmseg's IoUMetric on `eval_split` (mIoU, aAcc, mAcc as fractions)."""
        from mmseg.evaluation import IoUMetric

        ds = self.dataset(self.options.eval_split)
        idx = self.eval_indices(len(ds))
        metric = IoUMetric(iou_metrics=["mIoU"], ignore_index=IGNORE_INDEX, prefix="val")  # a prefix: no warning
        metric.dataset_meta = ds.metainfo
        was_training = model.training
        model.eval()
        for i in range(0, len(idx), self.options.batch_size):
            images, labels = self.load(self.options.eval_split, idx[i:i + self.options.batch_size])
            pred = model(images.to(device)).argmax(1).cpu()
            metric.process({}, [{"pred_sem_seg": {"data": p[None]}, "gt_sem_seg": {"data": t[None]}}
                                for p, t in zip(pred, labels)])
        model.train(was_training)
        result = _quietly(metric.compute_metrics, metric.results)
        return {"mIoU": float(result["mIoU"]) / 100, "aAcc": float(result["aAcc"]) / 100,
                "mAcc": float(result["mAcc"]) / 100, "eval_samples": int(len(idx))}

    def example_inputs(self) -> torch.Tensor:
        """The first evaluation image; without data (e.g. `--dry-run` before the dataset is in
        place) a zero image of size `scale`, which is a Cityscapes frame's size at that scale."""
        try:
            self.dataset(self.options.eval_split)
        except DataError:  # no data here (a bad file in data that is there is an error: `load` names it)
            if self.options.scale is None:
                raise
            width, height = self.options.scale
            log.warning("no data under %s: example input is a zero image of %dx%d", self.options.root, width, height)
            return torch.zeros(1, 3, height, width)
        return self.load(self.options.eval_split, [0])[0]

    # ---- quality targets (cswap/quality.py) ---------------------------------------------
    measures_outcomes = True
    per_class_metric = True

    def validation(self, seed: int, avoid, per_class: int) -> Manifold:
        """Images in which every class of the split appears at least `per_class` times, from
        `validation_split`, else from S's split without the images of `avoid`, never one the
        evaluation reads: the free images in a seeded order (a stream of its own), each kept
        while it shows a class seen in fewer than `per_class` kept images. A class seen in
        some but too few free images is refused; one in none is left out (as S leaves it)."""
        name, o = self.validation_source(), self.options
        ds = self.dataset(name)
        classes = list(ds.metainfo["classes"])
        free = np.flatnonzero(~self.excluded_from_validation(len(ds), avoid))
        seen, picked = np.zeros(len(classes), dtype=np.int64), []
        for i in np.random.default_rng([seed, 1]).permutation(free):
            if (seen >= per_class).all():
                break
            present = self._presence(ds, int(i), len(classes))
            if (present & (seen < per_class)).any():
                picked.append(int(i))
                seen += present
        short = [k for k in range(len(classes)) if 0 < seen[k] < per_class]
        if short:
            k = short[0]
            raise short_of(name, f"class {k} ({classes[k]})", seen[k], per_class, "images showing it")
        picked = np.sort(np.asarray(picked, dtype=np.int64))
        log.info("validation: %d images of split %r; images per class %s", len(picked), name, seen.tolist())
        batches = [self.load(name, picked[i:i + o.batch_size]) for i in range(0, len(picked), o.batch_size)]
        return Manifold(batches, {int(k): int(n) for k, n in enumerate(seen) if n}, picked)

    @torch.no_grad()
    def outcomes(self, model: nn.Module, device: torch.device | str = "cpu", samples: Manifold | None = None):
        """Per image and class, the pixels of the intersection and of the union of prediction and
        label (the ignore index left out): class c's IoU is sum of intersections / sum of unions
        over the images, mIoU their mean over the classes with a union (mmseg's IoUMetric); on
        `samples`, or on what `evaluate` reads."""
        from cswap.interfaces import Outcomes

        o = self.options
        if samples is None:
            idx = self.eval_indices(len(self.dataset(o.eval_split)))
            batches = (self.load(o.eval_split, idx[i:i + o.batch_size]) for i in range(0, len(idx), o.batch_size))
        else:
            batches = iter(samples)
        classes = list(self.dataset(o.eval_split if samples is None else self.validation_source()).metainfo["classes"])
        was_training = model.training
        model.eval()
        inter, union = [], []
        for images, labels in batches:
            pred = model(images.to(device)).argmax(1).cpu()
            i, u = _intersection_union(pred, labels.cpu(), len(classes))
            inter.append(i)
            union.append(u)
        model.train(was_training)
        return Outcomes(np.concatenate(inter), None, np.concatenate(union), classes)


def _intersection_union(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) pixels of intersection and of union per image and class, ignore pixels left out."""
    n = len(labels)
    valid = labels != IGNORE_INDEX
    image = torch.arange(n).view(n, 1, 1).expand_as(labels)
    code = (image * num_classes + labels.clamp(max=num_classes - 1)) * num_classes + pred
    counts = torch.bincount(code[valid], minlength=n * num_classes * num_classes)
    confusion = counts.view(n, num_classes, num_classes).double().numpy()  # [image, label, prediction]
    inter = np.diagonal(confusion, axis1=1, axis2=2)
    return inter.copy(), confusion.sum(2) + confusion.sum(1) - inter


def _check_items(ds, indices: list[int], items: list, split: str) -> None:
    """Every image has a label map of its own size (one channel), and all images one size."""
    for i, item in zip(indices, items):
        image, label = item["inputs"], item["data_samples"].gt_sem_seg.data
        if label.dim() != 3 or label.shape[0] != 1 or tuple(label.shape[1:]) != tuple(image.shape[-2:]):
            raise DataError(f"label map {ds.get_data_info(i)['seg_map_path']} (split {split!r}) has shape "
                            f"{tuple(label.shape)}, not one channel of its image's size {tuple(image.shape[-2:])}")
    shapes = {tuple(it["inputs"].shape) for it in items}
    if len(shapes) > 1:
        raise DataError(f"images of split {split!r} differ in size {sorted(shapes)}; set task option scale")


def _check_values(ds, indices: list[int], images: torch.Tensor, labels: torch.Tensor, split: str) -> None:
    """Finite normalised images (a zero std in the data_preprocessor gives infinities) and
    labels that are classes of the dataset or its ignore index 255; the first offender named."""
    finite = torch.isfinite(images.reshape(len(images), -1)).all(1)
    if not bool(finite.all()):
        first = indices[int(torch.nonzero(~finite)[0, 0])]
        raise DataError(f"image {ds.get_data_info(first)['img_path']} (split {split!r}) is not finite after "
                        "normalisation: check the mmseg config's data_preprocessor mean and std (a zero std?)")
    classes = len(ds.metainfo["classes"])
    valid = (labels < classes) | (labels == IGNORE_INDEX)
    if not bool(valid.all()):
        n = int(torch.nonzero(~valid.reshape(len(labels), -1).all(1))[0, 0])
        value = int(labels[n][~valid[n]][0])
        raise DataError(f"label map {ds.get_data_info(indices[n])['seg_map_path']} (split {split!r}) holds label "
                        f"{value}, which is neither one of the {classes} classes (0 to {classes - 1}) nor the ignore "
                        f"index {IGNORE_INDEX}; are these labelTrainIds maps?")


def _check_label_maps(ds, root: Path, split: str) -> None:
    """Every image has its `*_gtFine_labelTrainIds.png`; the most common mistake (only the
    `*_labelIds.png` of the download are there) is named with the command that makes them."""
    missing = [Path(item["seg_map_path"]) for item in ds.data_list if not Path(item["seg_map_path"]).is_file()]
    if not missing:
        return
    first = missing[0]
    label_ids = first.with_name(first.name.replace("_labelTrainIds.png", "_labelIds.png"))
    why = (f"only {label_ids.name} is there: the downloaded label ids must be converted to the 19 train ids, with "
           f"cityscapesscripts: pip install cityscapesscripts && CITYSCAPES_DATASET={root} csCreateTrainIdLabelImgs "
           "(or mmseg's tools/dataset_converters/cityscapes.py)" if label_ids.is_file() else "label maps are missing")
    raise DataError(f"{len(missing)} of {len(ds)} images of split {split!r} have no label map {first.name} under "
                    f"{root / 'gtFine' / split}; {why}")


def _quietly(fn, *args):
    """Run `fn` with mmengine's logger at WARNING: IoUMetric logs a per-class table on every
    call, and a pruning curve evaluates dozens of times."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        return fn(*args)
    finally:
        logger.setLevel(level)
