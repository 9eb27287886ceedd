"""Job rows (HTTP-free): submit, atomic claim with a lease, heartbeat, progress, cancel, finish, hand back.

Crash safety rests on leases: a running job belongs to the worker whose lease is live; a worker that dies
(``kill -9``) stops renewing it, and once it expires the next claim re-runs the job from scratch (results
are written to a fresh work folder and stored content-addressed, so a half-finished attempt leaves nothing
that is read). A job that has used up ``max_attempts`` claims is marked failed with the reason, never dropped.
Claims are safe between processes and hosts: on Postgres the candidate row is taken with ``SELECT ... FOR
UPDATE SKIP LOCKED`` (claimers never queue behind each other), on SQLite the database's single writer lock
serialises them; either way the claim is a compare-and-set UPDATE that a lost race leaves untouched.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, text, update
from sqlalchemy.orm import Session, aliased

from retrogen.errors import InvalidInputError

from ..core.db import Database
from ..core.errors import ConflictError
from ..core.migrations import LOCK_NAMESPACE
from ..core.tables import Dataset, Job, JobEvent, new_id

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")
STATES = ACTIVE + TERMINAL


def _event(s: Session, job_id: str, kind: str, message: str | None = None, **fields: Any) -> None:
    s.add(JobEvent(job_id=job_id, time=time.time(), kind=kind, message=message, **fields))


def submit(db: Database, *, owner: str, dataset: Dataset | None, kind: str, method: str, per_class: int,
           index_name: str | None, model_name: str | None, params: dict[str, Any]) -> Job:
    """Queue a job; ``dataset`` None is a names-only job (its classes in ``params``), stored with empty ids."""
    now = time.time()
    job = Job(id=new_id("job"), owner=owner, dataset_id=dataset.id if dataset else "",
              dataset_key=dataset.content_key if dataset else "", kind=kind,
              method=method, per_class=per_class, index_name=index_name, model_name=model_name, params=params,
              state="queued",
              cancel_requested=False, attempts=0, progress={}, created=now)
    with db.session() as s:
        s.add(job)
        s.flush()
        _event(s, job.id, "state", "queued")
    log.info("job %s queued: %s x%d on %s", job.id, method, per_class, dataset.id if dataset else "class names")
    return job


def get_job(db: Database, owner: str, job_id: str) -> Job:
    return db.get_owned(Job, job_id, owner, what="job")


def list_jobs(db: Database, owner: str, *, state: str | None = None, dataset_id: str | None = None,
              limit: int = 100, offset: int = 0) -> tuple[list[Job], int]:
    where = [Job.owner == owner]
    if state:
        if state not in STATES:
            raise InvalidInputError(f"state must be one of {', '.join(STATES)}, got {state!r}")
        where.append(Job.state == state)
    if dataset_id:
        where.append(Job.dataset_id == dataset_id)
    with db.session() as s:
        count = s.scalar(select(func.count()).select_from(Job).where(*where)) or 0
        rows = s.scalars(select(Job).where(*where).order_by(Job.created.desc()).limit(limit).offset(offset)).all()
        return list(rows), int(count)


def list_events(db: Database, owner: str, job_id: str, *, after: int = 0, limit: int = 500) -> list[JobEvent]:
    get_job(db, owner, job_id)
    with db.session() as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
                              .order_by(JobEvent.id).limit(limit)).all())


def request_cancel(db: Database, owner: str, job_id: str) -> Job:
    """Queued: cancelled now. Running: flagged; the runner stops at its next cancel check. Finished: 409."""
    job = get_job(db, owner, job_id)
    now = time.time()
    with db.session() as s:
        if job.state == "queued":
            n = s.execute(update(Job).where(Job.id == job_id, Job.state == "queued")
                          .values(state="cancelled", cancel_requested=True, finished=now)).rowcount
            if n:
                _event(s, job_id, "state", "cancelled before it started")
        if job.state == "running" or (job.state == "queued" and not n):
            s.execute(update(Job).where(Job.id == job_id, Job.state.in_(ACTIVE)).values(cancel_requested=True))
            _event(s, job_id, "state", "cancel requested")
    job = get_job(db, owner, job_id)
    if job.state in ("succeeded", "failed"):
        raise ConflictError(f"job {job_id} already {job.state}; nothing to cancel")
    return job


def reap(db: Database, max_attempts: int) -> int:
    """Settle expired leases that must not run again: cancel-requested ones, and ones out of attempts."""
    now = time.time()
    expired = and_(Job.state == "running", Job.lease_expires < now)
    with db.session() as s:
        # id order: concurrent reapers on Postgres lock rows in the same order, so they never deadlock
        ids = s.scalars(select(Job.id).where(expired, Job.cancel_requested.is_(True)).order_by(Job.id)).all()
        for jid in ids:
            if s.execute(update(Job).where(Job.id == jid, expired).values(
                    state="cancelled", finished=now, worker=None)).rowcount:
                _event(s, jid, "state", "cancelled (its worker stopped before acknowledging)")
        lost = s.scalars(select(Job.id).where(expired, Job.attempts >= max_attempts).order_by(Job.id)).all()
        for jid in lost:
            reason = (f"its worker stopped responding (lease expired) on each of {max_attempts} attempts; "
                      "the job may crash its worker")
            if s.execute(update(Job).where(Job.id == jid, expired).values(
                    state="failed", error=reason, finished=now, worker=None)).rowcount:
                _event(s, jid, "state", f"failed: {reason}")
        return len(ids) + len(lost)


def claim(db: Database, kind: str, worker: str, *, device: str, lease_s: float, max_attempts: int) -> Job | None:
    """Atomically take the oldest queued (or lease-expired) job of ``kind``; None if there is none.

    Generation jobs are claimed only while no other generation holds a live lease on ``device``.
    """
    reap(db, max_attempts)
    now = time.time()
    claimable = and_(Job.kind == kind, or_(Job.state == "queued", and_(Job.state == "running", Job.lease_expires < now)))
    conds = [claimable]
    if kind == "generation":
        other = aliased(Job)
        conds.append(~exists().where(other.kind == "generation", other.state == "running", other.device == device,
                                     other.lease_expires >= now))
    postgres = db.dialect == "postgresql"
    with db.session() as s:
        for _ in range(5):  # lose a race -> try the next candidate
            if postgres and kind == "generation":
                lock_device(s, device)
            pick = select(Job.id, Job.state, Job.attempts).where(*conds).order_by(Job.created).limit(1)
            cand = s.execute(pick.with_for_update(skip_locked=True) if postgres else pick).first()
            if cand is None:
                return None
            n = s.execute(update(Job).where(Job.id == cand.id, *conds).values(
                state="running", worker=worker, device=device, lease_expires=now + lease_s,
                attempts=Job.attempts + 1, started=func.coalesce(Job.started, now))).rowcount
            if n == 1:
                msg = (f"claimed by {worker}" if cand.state == "queued" else
                       f"re-claimed by {worker} after its previous worker stopped (attempt {cand.attempts + 1})")
                _event(s, cand.id, "state", msg)
                s.commit()
                return s.get(Job, cand.id)
            s.rollback()
    return None


def lock_device(s: Session, device: str) -> None:
    """Serialise generation claims on ``device`` until this transaction ends (Postgres).

    Row locks alone cannot keep the one-generation-per-device rule: two workers under READ COMMITTED each lock a
    *different* queued job, each sees no running generation on the device, and both claim. Holding this lock
    from before the NOT EXISTS check until commit makes the second claimer's check run after the first's claim
    is visible. An advisory lock keyed on the device name needs no table of devices (a row lock would need a
    row per device, created on first use); a hash collision between two names only serialises more.
    """
    s.execute(text("SELECT pg_advisory_xact_lock(:ns, hashtext(:device))"), {"ns": LOCK_NAMESPACE, "device": device})


def heartbeat(db: Database, job_id: str, worker: str, lease_s: float) -> bool:
    """Renew the lease; False if this worker no longer holds the job (it must stop)."""
    with db.session() as s:
        return s.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.state == "running")
                         .values(lease_expires=time.time() + lease_s)).rowcount == 1


def cancel_requested(db: Database, job_id: str) -> bool:
    with db.session() as s:
        return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def record_progress(db: Database, job_id: str, worker: str, progress: dict[str, Any],
                    event: dict[str, Any] | None = None) -> None:
    with db.session() as s:
        n = s.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.state == "running")
                      .values(progress=progress)).rowcount
        if n and event:
            _event(s, job_id, "progress", **event)


def finish(db: Database, job_id: str, worker: str, *, state: str, error: str | None = None,
           result_key: str | None = None, summary: dict[str, Any] | None = None,
           num_images: int | None = None, progress: dict[str, Any] | None = None) -> bool:
    """Settle a running job this worker holds. False if the lease was lost (another worker owns it now)."""
    if state not in TERMINAL:
        raise ValueError(f"state must be one of {TERMINAL}, got {state!r}")
    values: dict[str, Any] = dict(state=state, error=error, result_key=result_key, summary=summary,
                                  num_images=num_images, finished=time.time(), lease_expires=None)
    if progress is not None:
        values["progress"] = progress
    with db.session() as s:
        n = s.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.state == "running")
                      .values(**values)).rowcount
        if n:
            _event(s, job_id, "state", state if not error else f"{state}: {error}")
        return n == 1


def hand_back(db: Database, job_id: str, worker: str) -> bool:
    """Return a job this worker abandons on purpose (shutting down) to the queue; the attempt is not counted."""
    with db.session() as s:
        n = s.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.state == "running")
                      .values(state="queued", worker=None, lease_expires=None,
                              attempts=Job.attempts - 1)).rowcount
        if n:
            _event(s, job_id, "state", f"handed back to the queue by {worker} (shutting down)")
        return n == 1


def jobs_using(db: Database, owner: str, *, method: str, param_key: str, value: str,
               limit: int = 200) -> list[Job]:
    """The owner's succeeded ``method`` jobs whose ``params[param_key]`` holds an entry with ``job == value``,
    newest first, among the newest ``limit`` (filtered in Python: JSON queries differ between SQLite and
    Postgres)."""
    with db.session() as s:
        rows = s.scalars(select(Job).where(Job.owner == owner, Job.method == method, Job.state == "succeeded")
                         .order_by(Job.created.desc()).limit(limit)).all()
    return [j for j in rows if any(isinstance(a, dict) and a.get("job") == value
                                   for a in (j.params or {}).get(param_key, {}).values())]


def queue_depth(db: Database) -> dict[tuple[str, str], int]:
    with db.session() as s:
        rows = s.execute(select(Job.kind, Job.state, func.count()).where(Job.state.in_(ACTIVE))
                         .group_by(Job.kind, Job.state)).all()
        return {(k, st): int(c) for k, st, c in rows}


def finished_stats(db: Database) -> list[tuple[str, str, str, int, float, int]]:
    """(kind, method, state, count, total duration s, images) of finished jobs, for /metrics."""
    with db.session() as s:
        rows = s.execute(select(Job.kind, Job.method, Job.state, func.count(),
                                func.sum(Job.finished - Job.started), func.sum(Job.num_images))
                         .where(Job.state.in_(TERMINAL), Job.started.is_not(None))
                         .group_by(Job.kind, Job.method, Job.state)).all()
        return [(k, m, st, int(c), float(d or 0), int(n or 0)) for k, m, st, c, d, n in rows]
