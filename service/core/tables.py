"""Database tables: datasets, jobs and their events. Every row carries its owner's key hash."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


def new_id(prefix: str) -> str:
    """A row id that says what it names: ``ds_...``, ``job_...``."""
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class Dataset(Base):
    """An uploaded dataset. Rows are per owner; the stored files are shared by content (``content_key``)."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200))
    content_key: Mapped[str] = mapped_column(String(100), index=True)  # storage address (content hash)
    num_images: Mapped[int] = mapped_column(Integer)
    num_bytes: Mapped[int] = mapped_column(Integer)
    classes: Mapped[dict[str, int]] = mapped_column(JSON)  # label -> image count
    created: Mapped[float] = mapped_column(Float)


class Job(Base):
    """An augmentation job. ``state``: queued -> running -> succeeded | failed | cancelled."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    dataset_id: Mapped[str] = mapped_column(String(40), index=True)  # the row may be deleted later
    dataset_key: Mapped[str] = mapped_column(String(100))  # the dataset's content, fixed at submission
    kind: Mapped[str] = mapped_column(String(20))  # retrieval | generation: separate queues
    method: Mapped[str] = mapped_column(String(50))
    per_class: Mapped[int] = mapped_column(Integer)
    # configured names (Settings.indexes / Settings.models); the columns keep their first names
    index_name: Mapped[str | None] = mapped_column("index", String(200), nullable=True)
    model_name: Mapped[str | None] = mapped_column("model", String(200), nullable=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(20), default="queued")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)  # lease holder
    device: Mapped[str | None] = mapped_column(String(50), nullable=True)
    lease_expires: Mapped[float | None] = mapped_column(Float, nullable=True)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result_key: Mapped[str | None] = mapped_column(String(100), nullable=True)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    num_images: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created: Mapped[float] = mapped_column(Float)
    started: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (Index("ix_jobs_queue", "kind", "state", "created"),)


class JobEvent(Base):
    """A state change or progress step of a job (the job's history; progress rows are throttled)."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    time: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(20))  # state | progress
    stage: Mapped[str | None] = mapped_column(String(50), nullable=True)
    done: Mapped[int | None] = mapped_column(Integer, nullable=True)
    total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
