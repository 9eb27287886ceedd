"""Dataset rows (HTTP-free): add, get, list, delete. The files live in the store, shared by content."""

from __future__ import annotations

import time

from sqlalchemy import func, select

from ..core.db import Database
from ..core.errors import ConflictError
from ..core.tables import Dataset, Job, new_id
from .jobs import ACTIVE


def add_dataset(db: Database, *, owner: str, name: str, content_key: str, classes: dict[str, int],
                num_images: int, num_bytes: int) -> tuple[Dataset, bool]:
    """Record stored content for ``owner``; returns (row, created). The owner's row for equal content is
    returned as it is, so uploading the same files twice gives one dataset."""
    with db.session() as s:
        existing = s.scalars(select(Dataset).where(Dataset.owner == owner, Dataset.content_key == content_key)).first()
        if existing is not None:
            return existing, False
        ds = Dataset(id=new_id("ds"), owner=owner, name=name, content_key=content_key, num_images=num_images,
                     num_bytes=num_bytes, classes=classes, created=time.time())
        s.add(ds)
    return ds, True


def get_dataset(db: Database, owner: str, dataset_id: str) -> Dataset:
    return db.get_owned(Dataset, dataset_id, owner, what="dataset")


def list_datasets(db: Database, owner: str, *, limit: int = 100, offset: int = 0) -> tuple[list[Dataset], int]:
    with db.session() as s:
        count = s.scalar(select(func.count()).select_from(Dataset).where(Dataset.owner == owner)) or 0
        rows = s.scalars(select(Dataset).where(Dataset.owner == owner).order_by(Dataset.created.desc())
                         .limit(limit).offset(offset)).all()
        return list(rows), int(count)


def delete_dataset(db: Database, owner: str, dataset_id: str) -> str | None:
    """Delete the row; refused (409) while jobs on it are queued or running. Finished jobs keep their results.

    Returns the content key when nothing refers to the stored files any more (no dataset row, no active job),
    so the caller can delete them; None while they are still in use.
    """
    ds = get_dataset(db, owner, dataset_id)
    with db.session() as s:
        active = s.scalar(select(func.count()).select_from(Job).where(Job.dataset_id == ds.id, Job.state.in_(ACTIVE)))
        if active:
            raise ConflictError(f"dataset {dataset_id} has {active} queued or running job(s); cancel them first")
        s.delete(s.get(Dataset, ds.id))
        s.flush()
        rows = s.scalar(select(func.count()).select_from(Dataset).where(Dataset.content_key == ds.content_key))
        jobs = s.scalar(select(func.count()).select_from(Job).where(Job.dataset_key == ds.content_key,
                                                                      Job.state.in_(ACTIVE)))
    return None if (rows or 0) + (jobs or 0) else ds.content_key
