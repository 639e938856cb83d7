"""Where the benchmarks find their data, and what a fresh machine must do to have it.

Every benchmark here reads the full Fashion-MNIST (MIT licence, Zalando SE) from its four IDX
files. Nothing is downloaded: on Debian/Ubuntu the files come from a package,

    sudo apt-get update && sudo apt-get install dataset-fashion-mnist

which puts them under /usr/share/datasets/fashion-mnist/. Elsewhere put the files
`{train,t10k}-{images-idx3,labels-idx1}-ubyte` (gzipped or not) in any folder and name it with
CSWAP_FASHION_MNIST=DIR. `fashion_mnist_root()` is called first thing by every benchmark, so
a machine without the data stops at once with this hint, not after minutes of setup.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "CSWAP_FASHION_MNIST"
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SETUP = (f"one-time setup: `sudo apt-get update && sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, "
         f"installs {DEBIAN_FASHION_MNIST}), or set {FASHION_MNIST_ENV}=DIR for a folder holding "
         f"{', '.join(FILES)} (.gz or not)")


def fashion_mnist_root(root: str | Path | None = None) -> Path:
    """The folder with the four Fashion-MNIST IDX files: `root`, else $CSWAP_FASHION_MNIST, else
    Debian's. Exits with status 2 and the setup hint when a file is missing."""
    folder = Path(root or os.environ.get(FASHION_MNIST_ENV) or DEBIAN_FASHION_MNIST)
    missing = [f for f in FILES if not (folder / f).exists() and not (folder / f"{f}.gz").exists()]
    if missing:
        where = f"{folder} does not exist" if not folder.is_dir() else f"{folder} lacks {', '.join(missing)}"
        print(f"error: Fashion-MNIST not found: {where}; {SETUP}", file=sys.stderr)
        raise SystemExit(2)
    return folder
