"""Write the small, class-balanced Fashion-MNIST subset embedded with the demo.

The demo must run without the full dataset (or a download), so it ships a few hundred KB:
a manifold set S drawn from the TRAIN split (the images whose activations C-SWAP scores) and
a held-out evaluation set drawn from the TEST split. Both are balanced per class and drawn
with a seeded numpy Generator, so every regeneration stores identical arrays.

    python benchmarks/make_demo_subset.py

Data: the full Fashion-MNIST, read locally (`apt-get install dataset-fashion-mnist`, or
CSWAP_FASHION_MNIST=DIR; see benchmarks/datasets.py); without it the script stops at once
with that hint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np

from benchmarks.datasets import fashion_mnist_root
from cswap.tasks.idx_files import FASHION_MNIST_CLASSES, load_mnist_split


def balanced_sample(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `per_class` random images of every class, sorted by class then original index.

    Sorting keeps the file deterministic and easy to inspect; callers that need a random order
    shuffle themselves.
    """
    picks = []
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class:
            raise ValueError(f"class {c} has only {len(pool)} images, asked for {per_class}")
        picks.append(np.sort(rng.choice(pool, size=per_class, replace=False)))
    return np.concatenate(picks)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=None,
                   help="folder with the four IDX files (default: $CSWAP_FASHION_MNIST, else Debian's; see benchmarks/datasets.py)")
    p.add_argument("--per-class", type=int, default=64, help="manifold images per class (train split)")
    p.add_argument("--eval-per-class", type=int, default=200, help="evaluation images per class (test split)")
    p.add_argument("--validation-per-class", type=int, default=300,
                   help="validation images per class (train split, none of the manifold images): what a quality "
                   "target (pruning.max_drop) is checked on; drawn last, so the other arrays do not depend on it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "cswap" / "demo" / "fashion_mnist_subset.npz")
    args = p.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    args.root = fashion_mnist_root(args.root)
    train_images, train_labels = load_mnist_split(args.root, "train")
    test_images, test_labels = load_mnist_split(args.root, "test")
    m = balanced_sample(train_labels, args.per_class, rng)
    e = balanced_sample(test_labels, args.eval_per_class, rng)
    rest = np.setdiff1d(np.arange(len(train_labels)), m)
    v = rest[balanced_sample(train_labels[rest], args.validation_per_class, rng)]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        manifold_images=np.ascontiguousarray(train_images[m], dtype=np.uint8),
        manifold_labels=train_labels[m].astype(np.int64),
        eval_images=np.ascontiguousarray(test_images[e], dtype=np.uint8),
        eval_labels=test_labels[e].astype(np.int64),
        validation_images=np.ascontiguousarray(train_images[v], dtype=np.uint8),
        validation_labels=train_labels[v].astype(np.int64),
        classes=np.array(FASHION_MNIST_CLASSES, dtype=np.str_),
    )
    print(f"wrote {args.out}: {len(m)} manifold (train) + {len(e)} eval (test) + {len(v)} validation (train) images, "
          f"{args.out.stat().st_size / 1024:.0f} KiB")
    return args.out


if __name__ == "__main__":
    main()
