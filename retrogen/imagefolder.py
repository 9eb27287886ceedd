"""Reading and writing labelled datasets in ImageFolder layout (``class_name/*.jpg``)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInputError
from .imageio import IMAGE_EXTENSIONS

_SAFE_CLASS = re.compile(r"^[^/\\\x00]+$")


class DatasetLayoutError(InvalidInputError):
    """The folder is not a usable ImageFolder dataset."""


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: str

    @property
    def image_id(self) -> str:
        """Stable id inside the dataset: ``label/filename``."""
        return f"{self.label}/{self.path.name}"


def scan_imagefolder(root: str | os.PathLike, *, min_per_class: int = 1) -> list[LabelledImage]:
    """List ``root/<class>/<image>`` files sorted by (class, name).

    Only direct image files of each class folder count; hidden files/folders are ignored.

    Raises:
        DatasetLayoutError: missing folder, no class folders, images loose at the top level, or a class
            with fewer than ``min_per_class`` images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset folder not found: {root}")
    loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        raise DatasetLayoutError(
            f"{root} has images at its top level ({loose[0]!r}, ...); expected class_name/image files"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetLayoutError(f"{root} has no class folders; expected class_name/image files")
    items: list[LabelledImage] = []
    for cls in classes:
        files = sorted(
            p for p in (root / cls).iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if len(files) < min_per_class:
            raise DatasetLayoutError(f"class {cls!r} has {len(files)} images; at least {min_per_class} needed")
        items.extend(LabelledImage(p, cls) for p in files)
    return items


def class_names(items: list[LabelledImage]) -> list[str]:
    return sorted({it.label for it in items})


def safe_class_dir(label: str) -> str:
    """A label usable as one folder name (no separators, not '.'/'..')."""
    if not _SAFE_CLASS.match(label) or label in (".", ".."):
        raise DatasetLayoutError(f"class name {label!r} cannot be a folder name")
    return label
