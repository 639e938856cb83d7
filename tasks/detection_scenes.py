"""Synthetic detection scenes in the detection task's `.npz` format.

Objects are pasted onto a dark, noisy canvas at random positions and sizes, at most
`max_objects` per image, overlapping another object's box by at most `max_overlap` IoU,
boxes tight around each pasted object's visible pixels. Two sources:
- `fashion_mnist`: items of the given Fashion-MNIST classes (Debian's IDX files under
  /usr/share/datasets/fashion-mnist), rescaled to 16-32 px;
- `shapes`: filled square, disk, triangle and cross, no data needed (tests).

File layout written by `write_npz` (and read by `tasks.detection.DetectionTask`):
`<split>_images` (N, H, W) uint8, `<split>_boxes` (N, B, 4) float32 x1, y1, x2, y2 in
pixels (x2, y2 exclusive), `<split>_labels` (N, B) int64 with -1 padding, `classes` (names).
`write_coco` writes the same scenes in COCO's format (RGB PNG files and an annotation JSON
per split, `tasks/coco.py`), the layout of real detection data sets.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SHAPES = ("square", "disk", "triangle", "cross")


def _shape(kind: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c, r = size / 2, size / 2
    if kind == "square":
        m = np.ones((size, size), bool)
    elif kind == "disk":
        m = (yy - c) ** 2 + (xx - c) ** 2 <= r ** 2
    elif kind == "triangle":
        m = np.abs(xx - c) <= yy / 2
    elif kind == "cross":
        m = (np.abs(xx - c) <= size / 6) | (np.abs(yy - c) <= size / 6)
    else:
        raise ValueError(f"unknown shape {kind!r}; known: {SHAPES}")
    return m.astype(np.float32)


def _resize(item: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(item.astype(np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def make_scenes(n: int, *, size: int = 64, source: str = "shapes", classes: tuple[int, ...] = (0, 1, 2),
                max_objects: int = 3, object_sizes: tuple[int, int] = (16, 32), max_overlap: float = 0.1,
                fashion_root: str | Path | None = None, fashion_split: str = "train", seed: int = 0):
    """`n` scenes: images (n, size, size) uint8, boxes (n, max_objects, 4), labels (n, max_objects).
    Labels are 0..len(classes)-1 (indices into `classes`)."""
    rng = np.random.default_rng(seed)
    pool = None
    if source == "fashion_mnist":
        from cswap.tasks.idx_files import DEBIAN_FASHION_MNIST, load_mnist_split

        images, labels = load_mnist_split(fashion_root or DEBIAN_FASHION_MNIST, fashion_split)
        pool = {k: images[labels == c] for k, c in enumerate(classes)}
    elif source != "shapes":
        raise ValueError(f"source must be 'shapes' or 'fashion_mnist', got {source!r}")
    out_images = np.zeros((n, size, size), np.uint8)
    out_boxes = np.zeros((n, max_objects, 4), np.float32)
    out_labels = np.full((n, max_objects), -1, np.int64)
    for i in range(n):
        canvas = rng.normal(20, 8, (size, size))
        placed = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            k = int(rng.integers(len(classes)))
            s = int(rng.integers(object_sizes[0], object_sizes[1] + 1))
            if pool is None:
                item = _shape(SHAPES[classes[k] % len(SHAPES)], s) * rng.uniform(150, 255)
            else:
                item = _resize(pool[k][rng.integers(len(pool[k]))], s)
            ys, xs = np.nonzero(item > 30)
            if len(ys) == 0:
                continue
            for _attempt in range(20):
                y0, x0 = (int(v) for v in rng.integers(0, size - s + 1, 2))
                box = np.array([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1], np.float32)
                if all(_iou(box, b) <= max_overlap for b, _ in placed):
                    region = canvas[y0:y0 + s, x0:x0 + s]
                    np.copyto(region, np.maximum(region, item))
                    placed.append((box, k))
                    break
        for j, (box, k) in enumerate(placed):
            out_boxes[i, j], out_labels[i, j] = box, k
        out_images[i] = np.clip(canvas, 0, 255).astype(np.uint8)
    return out_images, out_boxes, out_labels


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def write_npz(path: str | Path, splits: dict[str, int], names: list[str] | None = None, seed: int = 0,
              **kwargs) -> Path:
    """Write scenes for each split (`{"train": 200, "test": 100}`), seeds differing per split."""
    arrays = {}
    for j, (split, n) in enumerate(splits.items()):
        images, boxes, labels = make_scenes(n, seed=seed + 1000 * j, **kwargs)
        arrays.update({f"{split}_images": images, f"{split}_boxes": boxes, f"{split}_labels": labels})
    classes = kwargs.get("classes", (0, 1, 2))
    if names is None:
        shapes = kwargs.get("source", "shapes") == "shapes"
        names = [SHAPES[c % len(SHAPES)] if shapes else str(c) for c in classes]
    path = Path(path)
    np.savez_compressed(path, classes=np.asarray(names), **arrays)
    return path


def write_coco(root: str | Path, splits: dict[str, int], names: list[str] | None = None, seed: int = 0,
               **kwargs) -> Path:
    """Scenes for each split (`{"train": 128, "val": 48}`, seeds as `write_npz`) in COCO's
    layout under `root`: `<split>/<id>.png` (grey scenes saved as RGB) and
    `annotations/instances_<split>.json`; category ids start at 1, as COCO's."""
    import json

    from PIL import Image

    root = Path(root)
    classes = kwargs.get("classes", (0, 1, 2))
    shapes = kwargs.get("source", "shapes") == "shapes"
    names = names or [SHAPES[c % len(SHAPES)] if shapes else str(c) for c in classes]
    categories = [{"id": k + 1, "name": name, "supercategory": "object"} for k, name in enumerate(names)]
    for j, (split, n) in enumerate(splits.items()):
        images, boxes, labels = make_scenes(n, seed=seed + 1000 * j, **kwargs)
        (root / split).mkdir(parents=True, exist_ok=True)
        entries, annotations = [], []
        for i, image in enumerate(images):
            name = f"{i:06d}.png"
            Image.fromarray(np.repeat(image[..., None], 3, axis=2)).save(root / split / name)
            entries.append({"id": i + 1, "file_name": name, "height": int(image.shape[0]),
                            "width": int(image.shape[1])})
            for box, label in zip(boxes[i], labels[i]):
                if label >= 0:
                    x1, y1, x2, y2 = (float(v) for v in box)
                    annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                                        "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                        "iscrowd": 0})
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return root
