"""Datasets from staged upload to stored content and back: the store holds the files (content-addressed),
the database the owner's row."""

from __future__ import annotations

import logging

from ..core.db import Database
from ..core.tables import Dataset
from ..crud import datasets as rows
from .storage import Store
from .uploads import StagedDataset, cleanup_staged

log = logging.getLogger(__name__)


def store_dataset(db: Database, store: Store, *, owner: str, name: str, staged: StagedDataset) -> Dataset:
    """Store the staged folder and record it for ``owner``; the staging folder is removed whatever happens.

    Uploading identical content again returns the owner's existing dataset.
    """
    try:
        key = store.put_tree("datasets", staged.root)
    finally:
        cleanup_staged(staged)
    ds, created = rows.add_dataset(db, owner=owner, name=name, content_key=key, classes=staged.classes,
                                   num_images=staged.num_images, num_bytes=staged.num_bytes)
    if created:
        log.info("dataset %s stored: %d images in %d classes", ds.id, ds.num_images, len(ds.classes))
    return ds


def delete_dataset(db: Database, store: Store, owner: str, dataset_id: str) -> None:
    """Delete the row (409 while jobs use it); the stored files go when nothing else refers to them."""
    unused_key = rows.delete_dataset(db, owner, dataset_id)
    if unused_key is not None:
        store.delete(unused_key)
