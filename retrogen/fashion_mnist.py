"""Fashion-MNIST, the real labelled data that installs from a package registry (the demo, the evidence
benchmark): loading it, and writing it in the layouts retrogen reads (webdataset shards, ImageFolders).

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (IDX files, 60k train + 10k test, 28x28
greyscale, MIT licence). Nothing here downloads anything.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

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


def to_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "L").save(buf, format="PNG")
    return buf.getvalue()


def to_rgb_image(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image, "L").convert("RGB")


def write_corpus_shards(images: np.ndarray, captions: list[str], keys: list[str], out: Path, *,
                        shard_size: int = 2000) -> list[Path]:
    """img2dataset's layout: ``{key}.png`` + ``{key}.txt`` (caption) + ``{key}.json`` per sample; existing shards
    are kept (a re-run reuses them)."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(images), shard_size):
        path = out / f"{s // shard_size:05d}.tar"
        shards.append(path)
        if path.exists():
            continue
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tar:
            for img, cap, key in zip(images[s : s + shard_size], captions[s : s + shard_size],
                                     keys[s : s + shard_size], strict=True):
                for ext, data in (("png", to_png(img)), ("txt", cap.encode()),
                                  ("json", json.dumps({"key": key, "caption": cap, "licence": "MIT"}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tmp.replace(path)
    return shards


def write_imagefolder(images: np.ndarray, labels: np.ndarray, out: Path, *, prefix: str,
                      names: list[str] = FASHION_MNIST_CLASSES) -> None:
    """``out/<class name>/<prefix><i>.png``; existing files are kept."""
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        d = out / names[y]
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{prefix}{i:05d}.png"
        if not p.exists():
            p.write_bytes(to_png(img))
