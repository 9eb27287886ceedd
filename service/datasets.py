"""Dataset records (HTTP-free): store a staged upload, list, get, delete. Files are shared by content."""

from __future__ import annotations

import logging
import time

from sqlalchemy import func, select

from retrogen.errors import NotFoundError
from retrogen.service.db import Database
from retrogen.service.errors import ConflictError
from retrogen.service.jobs import ACTIVE, new_id
from retrogen.service.models import Dataset, Job
from retrogen.service.storage import Store
from retrogen.service.uploads import StagedDataset, cleanup_staged

log = logging.getLogger(__name__)


def create_dataset(db: Database, store: Store, owner: str, name: str, staged: StagedDataset) -> Dataset:
    """Store the staged folder (content-addressed) and record it for ``owner``; the staging folder is removed.

    Uploading identical content again returns the owner's existing dataset.
    """
    try:
        key = store.put_tree("datasets", staged.root)
    finally:
        cleanup_staged(staged)
    with db.session() as s:
        existing = s.scalars(select(Dataset).where(Dataset.owner == owner, Dataset.content_key == key)).first()
        if existing is not None:
            return existing
        ds = Dataset(id=new_id("ds"), owner=owner, name=name, content_key=key, num_images=staged.num_images,
                     num_bytes=staged.num_bytes, classes=staged.classes, created=time.time())
        s.add(ds)
    log.info("dataset %s stored: %d images in %d classes", ds.id, ds.num_images, len(ds.classes))
    return ds


def get_dataset(db: Database, owner: str, dataset_id: str) -> Dataset:
    with db.session() as s:
        ds = s.get(Dataset, dataset_id)
        if ds is None or ds.owner != owner:
            raise NotFoundError(f"no dataset {dataset_id!r}")
        return ds


def list_datasets(db: Database, owner: str, *, limit: int = 100, offset: int = 0) -> tuple[list[Dataset], int]:
    with db.session() as s:
        count = s.scalar(select(func.count()).select_from(Dataset).where(Dataset.owner == owner)) or 0
        rows = s.scalars(select(Dataset).where(Dataset.owner == owner).order_by(Dataset.created.desc())
                         .limit(limit).offset(offset)).all()
        return list(rows), int(count)


def delete_dataset(db: Database, store: Store, owner: str, dataset_id: str) -> None:
    """Refused (409) while jobs on it are queued or running. Finished jobs keep their results.

    The stored files go when no dataset row and no active job refers to them any more.
    """
    ds = get_dataset(db, owner, dataset_id)
    with db.session() as s:
        active = s.scalar(select(func.count()).select_from(Job).where(Job.dataset_id == ds.id, Job.state.in_(ACTIVE)))
        if active:
            raise ConflictError(f"dataset {dataset_id} has {active} queued or running job(s); cancel them first")
        s.delete(s.get(Dataset, ds.id))
        s.flush()
        others = s.scalar(select(func.count()).select_from(Dataset).where(Dataset.content_key == ds.content_key))
        others = (others or 0) + (s.scalar(select(func.count()).select_from(Job).where(
            Job.dataset_key == ds.content_key, Job.state.in_(ACTIVE))) or 0)
    if not others:
        store.delete(ds.content_key)
