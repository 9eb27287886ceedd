"""Fashion-MNIST, the real labelled data that installs from a package registry (the demo, the evidence benchmark).

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (IDX files, 60k train + 10k test, 28x28
greyscale, MIT licence). Nothing here downloads anything.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from .errors import NotFoundError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 28, 28), labels int (n,)) for ``split`` in {"train", "test"}.

    Raises:
        NotFoundError: the Debian package is not installed (the message says how to install it).
    """
    root = Path(root) if root else FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}[split]
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        raise NotFoundError(
            f"Fashion-MNIST not found under {root}; install it with `sudo apt-get install dataset-fashion-mnist` "
            "(Debian/Ubuntu), or pass the folder holding the IDX .gz files"
        )
    return _read_idx(images), _read_idx(labels).astype(np.int64)


def stratified_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator,
                       exclude: np.ndarray | None = None) -> np.ndarray:
    """``per_class`` random indices of each label, avoiding ``exclude``."""
    mask = np.ones(len(labels), bool)
    if exclude is not None:
        mask[exclude] = False
    out = []
    for c in np.unique(labels):
        pool = np.flatnonzero((labels == c) & mask)
        out.append(rng.choice(pool, size=min(per_class, len(pool)), replace=False))
    return np.concatenate(out)
