"""Classification: the sample set S, accuracy, and the true-class-probability scorer.

Data comes from a local path (no downloads): torchvision's CIFAR10 folder, an ImageFolder
tree (`root/<split>/<class>/*.jpg`, e.g. ImageNet-10), Fashion-MNIST IDX files (Debian's
`dataset-fashion-mnist`), an `.npz` file with `<split>_images`/`<split>_labels`, or tensors
given in memory through the Python API. S is drawn from `manifold_split`, the accuracy is
measured on `eval_split`, so the samples that guide pruning never grade it.

ImageFolder images are normalised with `mean`/`std` when given; otherwise, when the model
carries timm's data config (`model.pretrained_cfg`, read in `bind_model`), with its mean, std,
input size, crop fraction and interpolation, as timm's own evaluation transform does; with
neither, they are left in [0, 1] with a warning (a model trained on normalised images then
sees other inputs than it was trained on).

Every split is checked when it is opened, before any analysis: one label per input, labels
that are non-negative integers and within the model's outputs, finite inputs (in-memory
tensors and float arrays); a violation is a `DataError` naming the split and the first
offending index.
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from cswap.errors import DataError
from cswap.interfaces import Manifold

from .sample_set import SampleSetOptions, SampleSetTask, short_of

log = logging.getLogger("cswap")

_DEFAULT_STATS = {"fashion_mnist": ((0.2860,), (0.3530,)), "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}


class _Split:
    """Labels of a split up front, images loaded on demand as normalised float tensors."""

    def __init__(self, labels: np.ndarray, load: Callable[[np.ndarray], torch.Tensor], classes: list[str] | None = None):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.load = load
        self.classes = classes

    def __len__(self) -> int:
        return len(self.labels)


def _uint8_loader(images: np.ndarray, mean, std) -> Callable[[np.ndarray], torch.Tensor]:
    """Images stored as uint8 arrays (N,H,W), (N,H,W,C) or float (N,C,H,W)."""
    def load(idx: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images[idx]))
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
            x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        x = x.float()
        if mean is not None:
            m = torch.tensor(mean).view(1, -1, 1, 1)
            s = torch.tensor(std).view(1, -1, 1, 1)
            x = (x - m) / s
        return x.contiguous()
    return load


def checked_labels(labels, split: str, inputs: int) -> np.ndarray:
    """`labels` as int64, refused (first offending index) unless there is one per input and
    each is a non-negative integer (a float label must be integral: 3.0, not 2.5)."""
    values = np.asarray(labels)
    if values.ndim != 1 or len(values) != inputs:
        raise DataError(f"split {split!r}: {inputs} inputs but labels of shape {values.shape} (one label per input)")
    if values.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if len(bad):
            raise DataError(f"split {split!r}: label {values[bad[0]].item()!r} at index {bad[0]} is not an integer")
    elif values.dtype.kind not in "iu":
        raise DataError(f"split {split!r}: labels must be integers, got dtype {values.dtype}")
    negative = np.flatnonzero(values < 0)
    if len(negative):
        raise DataError(f"split {split!r}: label {values[negative[0]]} at index {negative[0]} is negative")
    return values.astype(np.int64)


def check_finite(inputs, split: str) -> None:
    """Refuse a float input that holds NaN or infinity, naming the first such sample."""
    x = torch.as_tensor(inputs)
    if not x.is_floating_point() or len(x) == 0:
        return
    bad = torch.nonzero(~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)).flatten()
    if len(bad):
        raise DataError(f"split {split!r}: input {int(bad[0])} holds NaN or infinite values")


class ClassificationTask(SampleSetTask):
    default_scorer = "class_probability"
    default_test = "paired_t"
    metric = "accuracy"

    accepts_tensors = True

    class Options(SampleSetOptions):
        dataset: Literal["cifar10", "imagefolder", "fashion_mnist", "npz", "tensors"]
        root: Path | None = Field(None, description="local folder or file of the dataset")
        mean: list[float] | None = None
        std: list[float] | None = None
        image_size: int | None = Field(None, description="ImageFolder: resize and centre-crop to this size")
        input_shape: list[int] | None = Field(
            None, description="(C, H, W) of one input; lets --dry-run trace the model without reading data")

    def __init__(self, options: "ClassificationTask.Options"):
        super().__init__(options)
        self._tensors: dict = {}  # split name -> (inputs, targets), for dataset: tensors
        if options.dataset != "tensors" and options.root is None:
            raise DataError(f"task option root is required for dataset {options.dataset!r}")
        self._splits: dict[str, _Split] = {}
        self._model_outputs: int | None = None  # the bound model's output width (bind_model)
        self._data_config: dict | None = None  # timm's data config of the bound model, if it has one

    @classmethod
    def from_tensors(cls, inputs: torch.Tensor, targets: torch.Tensor, samples_per_class: int,
                     test: tuple[torch.Tensor, torch.Tensor] | None = None, **options) -> "ClassificationTask":
        """S drawn from `(inputs, targets)`; the metric is measured on the held-out `test`
        pair, or on the same tensors without one (the Python API does not evaluate).
        `options` are other task options (e.g. batch_size)."""
        task = cls(cls.Options(dataset="tensors", samples_per_class=samples_per_class, manifold_split="train",
                               eval_split="test" if test is not None else "train", **options))
        task._tensors = {"train": (inputs, targets), **({"test": test} if test is not None else {})}
        return task

    def bind_model(self, model: nn.Module) -> None:
        """Read what the data checks and the ImageFolder transform need from the model: its
        output width (one forward pass of one example input) and timm's data config."""
        config = getattr(model, "pretrained_cfg", None)
        self._data_config = dict(config) if isinstance(config, dict) and config.get("mean") else None
        if self.options.dataset == "imagefolder":
            self._splits.clear()  # opened before the model was known: transform again
        try:
            p = next(model.parameters())
            with torch.no_grad():
                out = model(self.example_inputs().to(p.device, p.dtype))
        except Exception as exc:  # noqa: BLE001 - the core's own checks report a model that cannot run
            log.debug("classification task: output width unknown (%s)", exc)
            return
        self._model_outputs = int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else None

    # ---- data sources -------------------------------------------------------------
    def _stats(self):
        o = self.options
        if o.mean is not None:
            return o.mean, (o.std or [1.0] * len(o.mean))
        return _DEFAULT_STATS.get(o.dataset, (None, None))

    def split(self, name: str) -> _Split:
        if name not in self._splits:
            self._splits[name] = self._open(name)
        split = self._splits[name]
        outputs = self._model_outputs
        if outputs is not None and len(split) and split.labels.max() >= outputs:
            first = int(np.flatnonzero(split.labels >= outputs)[0])
            raise DataError(f"split {name!r}: label {split.labels[first]} at index {first} is outside the model's "
                            f"{outputs} outputs (labels 0..{outputs - 1})")
        return split

    def _open(self, name: str) -> _Split:
        o, (mean, std) = self.options, self._stats()
        if o.root is not None and not Path(o.root).exists():
            raise DataError(f"dataset root {o.root} does not exist (task.options.root)")
        if o.dataset == "tensors":
            if name not in self._tensors:
                raise DataError(f"no in-memory split {name!r}; given: {sorted(self._tensors)}")
            x, y = self._tensors[name]
            x = torch.as_tensor(x)
            check_finite(x, name)
            labels = checked_labels(torch.as_tensor(y).cpu().numpy(), name, len(x))
            return _Split(labels, lambda idx: x[torch.as_tensor(idx)].float())
        if o.dataset == "fashion_mnist":
            from cswap.tasks.idx_files import FASHION_MNIST_CLASSES, load_mnist_split

            try:
                images, labels = load_mnist_split(o.root, name)
            except (FileNotFoundError, ValueError) as exc:
                raise DataError(str(exc)) from exc
            return _Split(labels, _uint8_loader(images, mean, std), list(FASHION_MNIST_CLASSES))
        if o.dataset == "npz":
            data = np.load(o.root, allow_pickle=False)
            if f"{name}_images" not in data:
                raise DataError(f"{o.root} has no arrays {name}_images/{name}_labels; has {sorted(data.files)}")
            classes = [str(c) for c in data["classes"]] if "classes" in data else None
            if f"{name}_labels" not in data:
                raise DataError(f"{o.root} has images but no labels for split {name!r} ({name}_labels)")
            images = data[f"{name}_images"]
            check_finite(images, name)
            return _Split(checked_labels(data[f"{name}_labels"], name, len(images)),
                          _uint8_loader(images, mean, std), classes)
        if o.dataset == "cifar10":
            from torchvision.datasets import CIFAR10

            try:
                ds = CIFAR10(str(o.root), train=(name == "train"), download=False)
            except RuntimeError as exc:
                raise DataError(f"CIFAR-10 not found under {o.root} (expected cifar-10-batches-py/): {exc}") from exc
            return _Split(np.asarray(ds.targets), _uint8_loader(ds.data, mean, std), list(ds.classes))
        return self._imagefolder(name, mean, std)

    def _imagefolder(self, name: str, mean, std) -> _Split:
        from torchvision.datasets import ImageFolder

        folder = Path(self.options.root) / name
        if not folder.is_dir():
            raise DataError(f"ImageFolder split {folder} does not exist")
        try:
            ds = ImageFolder(str(folder), transform=self._imagefolder_transform(mean, std))
        except (FileNotFoundError, OSError) as exc:  # no class folder, or class folders without images
            raise DataError(f"ImageFolder split {folder} holds no images in class folders "
                            f"(expected {folder}/<class>/*.jpg): {exc}") from None
        return _Split(np.asarray(ds.targets), lambda idx: torch.stack([ds[int(i)][0] for i in idx]), list(ds.classes))

    def _imagefolder_transform(self, mean, std):
        """Resize and centre-crop to `image_size`, normalise with `mean`/`std`; what is not given
        comes from timm's data config of the model (timm's evaluation transform: resize to
        size / crop_pct, its interpolation), else the image stays as it is, with a warning."""
        from torchvision import transforms

        timm_cfg, size = self._data_config or {}, self.options.image_size
        resize, interpolation = size, transforms.InterpolationMode.BILINEAR
        if size is None and timm_cfg.get("input_size"):
            size = int(timm_cfg["input_size"][-1])
            resize = int(math.floor(size / float(timm_cfg.get("crop_pct") or 0.875)))
            interpolation = transforms.InterpolationMode(timm_cfg.get("interpolation") or "bilinear")
        if mean is None and timm_cfg:
            mean, std = list(timm_cfg["mean"]), list(timm_cfg.get("std") or [1.0] * len(timm_cfg["mean"]))
        if timm_cfg:
            log.info("ImageFolder: size %s, mean %s, std %s (from the model's timm data config where not given)",
                     size, mean, std)
        if mean is None:
            msg = ("ImageFolder images are not normalised: no task option mean/std and the model carries no timm data "
                   "config; give mean and std (the statistics the model was trained with)")
            warnings.warn(msg)
            log.warning(msg)
        steps = [transforms.Resize(resize, interpolation=interpolation), transforms.CenterCrop(size)] if size else []
        steps.append(transforms.ToTensor())
        if mean is not None:
            steps.append(transforms.Normalize(mean, std))
        return transforms.Compose(steps)

    # ---- Task interface -------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Classes of the data: the largest label of S's and the evaluation split, or the
        class names the dataset lists (the core also counts the model's outputs)."""
        seen = [self.split(self.options.manifold_split)]
        try:
            seen.append(self.split(self.options.eval_split))
        except DataError:  # e.g. in-memory tensors with S's split only
            pass
        largest = max((int(s.labels.max()) + 1 for s in seen if len(s)), default=0)
        named = max((len(s.classes) for s in seen if s.classes), default=0)
        return max(largest, named)

    def manifold(self, seed: int, samples_per_class: int | None = None) -> Manifold:
        """M_k samples of every class, drawn without replacement with `seed`, class by class."""
        o, per_class = self.options, self.per_class(samples_per_class)
        split = self.split(o.manifold_split)
        if len(split) == 0:
            raise DataError(f"split {o.manifold_split!r} is empty")
        rng = np.random.default_rng(seed)
        chosen, counts = [], {}
        for k in np.unique(split.labels):
            idx = np.flatnonzero(split.labels == k)
            if len(idx) < per_class:
                name = f" ({split.classes[k]})" if split.classes and k < len(split.classes) else ""
                raise DataError(
                    f"class {k}{name} has {len(idx)} samples in split {o.manifold_split!r}, "
                    f"fewer than samples_per_class={per_class}"
                )
            chosen.append(np.sort(rng.choice(idx, per_class, replace=False)))
            counts[int(k)] = per_class
        order = np.concatenate(chosen)
        batches = [
            (split.load(order[i:i + o.batch_size]), torch.from_numpy(split.labels[order[i:i + o.batch_size]]))
            for i in range(0, len(order), o.batch_size)
        ]
        return Manifold(batches, counts, order)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device | str = "cpu") -> dict[str, float]:
        split = self.split(self.options.eval_split)
        idx = self.eval_indices(len(split))
        was_training = model.training
        model.eval()
        correct = 0
        for i in range(0, len(idx), self.options.batch_size):
            batch = idx[i:i + self.options.batch_size]
            pred = model(split.load(batch).to(device)).argmax(1).cpu().numpy()
            correct += int((pred == split.labels[batch]).sum())
        model.train(was_training)
        return {"accuracy": correct / max(len(idx), 1), "eval_samples": int(len(idx))}

    def example_inputs(self) -> torch.Tensor:
        if self.options.input_shape:
            return torch.zeros(1, *self.options.input_shape)
        split = self.split(self.options.eval_split)
        return split.load(np.arange(1))

    # ---- quality targets (cswap/quality.py) ---------------------------------------------
    measures_outcomes = True
    per_class_metric = True

    def validation(self, seed: int, avoid, per_class: int) -> Manifold:
        """`per_class` samples of every class, drawn without replacement (a seed stream of its
        own), from `validation_split`, else from S's split without the samples of `avoid`;
        never one the evaluation reads (`excluded_from_validation`)."""
        name = self.validation_source()
        split = self.split(name)
        free = ~self.excluded_from_validation(len(split), avoid)
        rng = np.random.default_rng([seed, 1])
        chosen = []
        for k in np.unique(split.labels):
            idx = np.flatnonzero((split.labels == k) & free)
            if len(idx) < per_class:
                label = f" ({split.classes[k]})" if split.classes and k < len(split.classes) else ""
                raise short_of(name, f"class {k}{label}", len(idx), per_class)
            chosen.append(np.sort(rng.choice(idx, per_class, replace=False)))
        order = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
        size = self.options.batch_size
        batches = [(split.load(order[i:i + size]), torch.from_numpy(split.labels[order[i:i + size]]))
                   for i in range(0, len(order), size)]
        return Manifold(batches, {int(k): per_class for k in np.unique(split.labels)}, order)

    @torch.no_grad()
    def outcomes(self, model: nn.Module, device: torch.device | str = "cpu", samples: Manifold | None = None):
        """Per sample 1 when the top class is the label, else 0, and the label: accuracy is
        their mean; on `samples`, or on what `evaluate` reads."""
        from cswap.interfaces import Outcomes

        if samples is None:
            split = self.split(self.options.eval_split)
            idx, size = self.eval_indices(len(split)), self.options.batch_size
            batches = ((split.load(idx[i:i + size]), split.labels[idx[i:i + size]]) for i in range(0, len(idx), size))
            names = split.classes
        else:
            batches = ((x, np.asarray(y.cpu())) for x, y in samples)
            names = self.split(self.validation_source()).classes
        was_training = model.training
        model.eval()
        right, labels = [], []
        for x, y in batches:
            right.append(model(x.to(device)).argmax(1).cpu().numpy() == y)
            labels.append(np.asarray(y, dtype=np.int64))
        model.train(was_training)
        values = np.concatenate(right).astype(np.float64) if right else np.zeros(0)
        return Outcomes(values, np.concatenate(labels) if labels else np.zeros(0, np.int64), None, names)
