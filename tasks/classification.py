"""Classification: the sample set S, accuracy, and the true-class-probability scorer.

Data comes from a local path (no downloads): torchvision's CIFAR10 folder, an ImageFolder
tree (`root/<split>/<class>/*.jpg`, e.g. ImageNet-10), Fashion-MNIST IDX files (Debian's
`dataset-fashion-mnist`), an `.npz` file with `<split>_images`/`<split>_labels`, or tensors
given in memory through the Python API. S is drawn from `manifold_split`, the accuracy is
measured on `eval_split`, so the samples that guide pruning never grade it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from cswap.errors import DataError
from cswap.interfaces import Manifold

from .sample_set import SampleSetOptions, SampleSetTask

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

    # ---- data sources -------------------------------------------------------------
    def _stats(self):
        o = self.options
        if o.mean is not None:
            return o.mean, (o.std or [1.0] * len(o.mean))
        return _DEFAULT_STATS.get(o.dataset, (None, None))

    def split(self, name: str) -> _Split:
        if name not in self._splits:
            self._splits[name] = self._open(name)
        return self._splits[name]

    def _open(self, name: str) -> _Split:
        o, (mean, std) = self.options, self._stats()
        if o.root is not None and not Path(o.root).exists():
            raise DataError(f"dataset root {o.root} does not exist (task.options.root)")
        if o.dataset == "tensors":
            if name not in self._tensors:
                raise DataError(f"no in-memory split {name!r}; given: {sorted(self._tensors)}")
            x, y = self._tensors[name]
            x = torch.as_tensor(x)
            return _Split(torch.as_tensor(y).cpu().numpy(), lambda idx: x[torch.as_tensor(idx)].float())
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
            return _Split(data[f"{name}_labels"], _uint8_loader(data[f"{name}_images"], mean, std), classes)
        if o.dataset == "cifar10":
            from torchvision.datasets import CIFAR10

            try:
                ds = CIFAR10(str(o.root), train=(name == "train"), download=False)
            except RuntimeError as exc:
                raise DataError(f"CIFAR-10 not found under {o.root} (expected cifar-10-batches-py/): {exc}") from exc
            return _Split(np.asarray(ds.targets), _uint8_loader(ds.data, mean, std), list(ds.classes))
        return self._imagefolder(name, mean, std)

    def _imagefolder(self, name: str, mean, std) -> _Split:
        from torchvision import transforms
        from torchvision.datasets import ImageFolder

        folder = Path(self.options.root) / name
        if not folder.is_dir():
            raise DataError(f"ImageFolder split {folder} does not exist")
        steps = []
        if self.options.image_size:
            steps += [transforms.Resize(self.options.image_size), transforms.CenterCrop(self.options.image_size)]
        steps.append(transforms.ToTensor())
        if mean is not None:
            steps.append(transforms.Normalize(mean, std))
        try:
            ds = ImageFolder(str(folder), transform=transforms.Compose(steps))
        except (FileNotFoundError, OSError) as exc:  # no class folder, or class folders without images
            raise DataError(f"ImageFolder split {folder} holds no images in class folders "
                            f"(expected {folder}/<class>/*.jpg): {exc}") from None
        return _Split(np.asarray(ds.targets), lambda idx: torch.stack([ds[int(i)][0] for i in idx]), list(ds.classes))

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
        return Manifold(batches, counts)

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
