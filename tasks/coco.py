"""Detection data in COCO's format: one annotation JSON per split and the image files.

Layout (COCO 2017's; split names are the folder names, e.g. `train2017`, `val2017`):
    root/annotations/instances_<split>.json
    root/<split>/<file_name of each image>
The JSON is read as data (`json`, never executed): `images` (id, file_name, width, height),
`annotations` (image_id, category_id, bbox [x, y, w, h] in pixels, iscrowd), `categories`
(id, name). Crowd annotations (`iscrowd: 1`) are left out, as COCO's own evaluation ignores
them. Labels are the categories in ascending id order, 0..K-1 (`labels: contiguous`), or the
category ids themselves (`labels: category_id`: what torchvision's COCO-trained detectors
predict, 91 outputs with gaps).

Images are read when asked for (a split of COCO does not fit in memory), as RGB, and resized
to `image_size` (H, W) with their boxes scaled alike; without `image_size` every image of a
split must have the same size, since the detection task batches them. A malformed file is a
one-line `DataError` naming the file and the first offending entry.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cswap.errors import DataError


@dataclass
class CocoSplit:
    """One split as the detection task reads every format: lazy images, padded boxes and labels."""

    images: "CocoImages"
    boxes: np.ndarray  # (N, B, 4) float32 x1, y1, x2, y2 in pixels of the (resized) image
    labels: np.ndarray  # (N, B) int64, -1 on padding
    classes: list[str]  # class names by label (an empty name for an unused category id)


class CocoImages:
    """The images of a split, loaded on indexing with an index array: (n, H, W, 3) uint8."""

    def __init__(self, folder: Path, entries: list[dict], image_size: tuple[int, int] | None):
        self.folder, self.entries, self.image_size = folder, entries, image_size

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, idx) -> np.ndarray:
        return np.stack([self._load(self.entries[int(i)]) for i in np.atleast_1d(idx)])

    def _load(self, entry: dict) -> np.ndarray:
        from PIL import Image

        path = self.folder / entry["file_name"]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if (image.height, image.width) != (entry["height"], entry["width"]):
                    raise DataError(f"{path} is {image.width}x{image.height}, its annotation says "
                                    f"{entry['width']}x{entry['height']}")
                if self.image_size is not None:
                    image = image.resize((self.image_size[1], self.image_size[0]), Image.BILINEAR)
                return np.asarray(image, dtype=np.uint8)
        except OSError as exc:
            raise DataError(f"image {path} of image id {entry['id']} cannot be read: {exc}") from None


def read_coco_split(root: str | Path, split: str, *, image_size: tuple[int, int] | None = None,
                    labels: str = "contiguous") -> CocoSplit:
    """The split `split` of the COCO-format folder `root` (module docstring)."""
    root = Path(root)
    path = root / "annotations" / f"instances_{split}.json"
    if not path.is_file():
        raise DataError(f"no COCO annotations for split {split!r}: {path} does not exist "
                        f"(expected root/annotations/instances_<split>.json)")
    data = _json(path)
    categories = _categories(data, path)
    label_of = ({c: k for k, c in enumerate(sorted(categories))} if labels == "contiguous"
                else {c: c for c in categories})
    entries = _image_entries(data, path, root / split)
    sizes = {(e["height"], e["width"]) for e in entries}
    if image_size is None and len(sizes) > 1:
        raise DataError(f"{path}: images of {len(sizes)} sizes (e.g. {sorted(sizes)[:2]}); the detection task "
                        "batches images: give task option image_size: [H, W] to resize them")
    position = {e["id"]: i for i, e in enumerate(entries)}
    objects: list[list[tuple[int, list[float]]]] = [[] for _ in entries]
    for n, ann in enumerate(_list(data, "annotations", path)):
        box = _annotation_box(ann, n, path, position, categories, entries)
        if box is not None:
            i, category, xyxy = box
            objects[i].append((label_of[category], _scaled(xyxy, entries[i], image_size)))
    width = max([1] + [len(o) for o in objects])
    boxes = np.zeros((len(entries), width, 4), np.float32)
    label_array = np.full((len(entries), width), -1, np.int64)
    for i, found in enumerate(objects):
        for j, (label, xyxy) in enumerate(found):
            boxes[i, j], label_array[i, j] = xyxy, label
    names = [""] * (max(label_of.values()) + 1 if label_of else 0)
    for category, label in label_of.items():
        names[label] = categories[category]
    return CocoSplit(CocoImages(root / split, entries, image_size), boxes, label_array, names)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} does not hold a JSON object (COCO: images, annotations, categories)")
    return data


def _list(data: dict, key: str, path: Path) -> list:
    value = data.get(key)
    if not isinstance(value, list):
        raise DataError(f"{path} has no list {key!r} (COCO: images, annotations, categories)")
    return value


def _categories(data: dict, path: Path) -> dict[int, str]:
    found = {}
    for n, c in enumerate(_list(data, "categories", path)):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or c["id"] < 0 or c["id"] in found:
            raise DataError(f"{path}: categories[{n}] needs a unique non-negative integer id, got {c!r}")
        found[c["id"]] = str(c.get("name", c["id"]))
    if not found:
        raise DataError(f"{path} lists no categories")
    return found


def _image_entries(data: dict, path: Path, folder: Path) -> list[dict]:
    entries, seen = [], set()
    for n, e in enumerate(_list(data, "images", path)):
        ok = isinstance(e, dict) and _is_int(e.get("id")) and isinstance(e.get("file_name"), str)
        ok = ok and all(_is_int(e.get(k)) and e[k] > 0 for k in ("width", "height"))
        if not ok or e["id"] in seen:
            raise DataError(f"{path}: images[{n}] needs a unique integer id, a file_name and positive integer "
                            f"width and height, got {e!r}")
        name = Path(e["file_name"])
        if name.is_absolute() or ".." in name.parts:
            raise DataError(f"{path}: images[{n}] file_name {e['file_name']!r} must be relative to {folder}")
        seen.add(e["id"])
        entries.append(e)
    return entries


def _annotation_box(ann, n: int, path: Path, position: dict, categories: dict, entries: list):
    """(image position, category id, [x1, y1, x2, y2]) of annotation `n`, None for a crowd; a
    one-line DataError for anything else that is not a box of a listed image and category."""
    where = f"{path}: annotations[{n}]"
    if not isinstance(ann, dict):
        raise DataError(f"{where} is not an object")
    if ann.get("iscrowd", 0):
        return None
    if ann.get("image_id") not in position:
        raise DataError(f"{where} names image_id {ann.get('image_id')!r}, which is not in images")
    if ann.get("category_id") not in categories:
        raise DataError(f"{where} names category_id {ann.get('category_id')!r}, which is not in categories")
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                             and math.isfinite(v) for v in bbox)):
        raise DataError(f"{where}: bbox must be 4 finite numbers [x, y, width, height], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    entry = entries[position[ann["image_id"]]]
    if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > entry["width"] + 1e-3 or y + h > entry["height"] + 1e-3:
        raise DataError(f"{where}: bbox {bbox} is empty or outside its {entry['width']}x{entry['height']} image")
    return position[ann["image_id"]], ann["category_id"], [x, y, x + w, y + h]


def _scaled(xyxy: list[float], entry: dict, image_size: tuple[int, int] | None) -> list[float]:
    if image_size is None:
        return xyxy
    sx, sy = image_size[1] / entry["width"], image_size[0] / entry["height"]
    return [xyxy[0] * sx, xyxy[1] * sy, xyxy[2] * sx, xyxy[3] * sy]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
