"""Reader for the IDX files of MNIST-family datasets (as shipped by Debian's
`dataset-fashion-mnist` under /usr/share/datasets/fashion-mnist/).

torchvision's FashionMNIST wants its own folder layout with uncompressed files and tries to
download otherwise; reading the four IDX files directly works on any local copy, gzipped or not.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (magic, dims, big-endian payload) into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[data[2]]
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(f"no {stem}[.gz] under {root}")


def load_mnist_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the `train` or `test` split."""
    root = Path(root)
    if split not in _PREFIX:
        raise ValueError(f"split must be one of {sorted(_PREFIX)}, got {split!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    images = read_idx(_find(root, f"{_PREFIX[split]}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{_PREFIX[split]}-labels-idx1-ubyte")).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in split {split}")
    return images, labels
