"""The job worker: lanes of threads that claim jobs by kind, run them, and store their results.

Retrieval and generation have separate lanes (threads), so a retrieval job never waits behind a long
generation; the generation lane has one thread per device by default, and the claim itself refuses a second
generation on a device that already runs one (across processes). ``retrogen worker`` runs this out of the
web process; ``retrogen serve`` starts one in-process. A worker that stops on purpose hands its running jobs
back to the queue; one that is killed loses its leases, and the jobs are re-claimed once they expire.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retrogen.errors import RetrogenError
from retrogen.outputs import OutputFolder
from retrogen.progress import CancelledError, ProgressEvent

from ..core.config import Settings
from ..core.db import Database
from ..core.tables import Job
from ..crud import jobs
from .indexes import IndexRegistry
from .runners import MethodRegistry, RunContext
from .storage import Store

log = logging.getLogger(__name__)


class _Interrupted(RetrogenError):
    """The worker is shutting down or lost the job's lease: the job is handed back, not failed."""


class ProgressTracker:
    """Turns library ProgressEvents into the job's progress (stage, overall done/total, done/total per class,
    ETA), throttled.

    A labelled event counts that class's own units (the ``ProgressEvent`` contract); its ``extra`` may carry
    the whole job's count as ``overall_done`` / ``overall_total`` (generation's do; the retrieval runner adds
    them). ``done`` / ``total`` are overall, so they never jump back when the next class starts.
    """

    def __init__(self, db: Database, job_id: str, worker: str, min_interval_s: float = 0.25):
        self.db, self.job_id, self.worker = db, job_id, worker
        self.min_interval_s = min_interval_s
        self.state: dict[str, Any] = {"stage": "starting", "done": 0, "total": 0, "per_class": {}, "eta_s": None}
        self._stage_first: tuple[float, int] = (time.monotonic(), 0)  # (time, overall done) at the stage's 1st event
        self._overall_stage: str | None = None  # a stage whose events carry overall counts
        self._last_write = 0.0
        self._last_event = 0.0

    def _overall(self, ev: ProgressEvent) -> tuple[int, int]:
        """The job's (done, total) after ``ev``: its overall extras, else (in a stage that reports them, for an
        event without: a class's start) the last known, else the event's own."""
        if "overall_done" in ev.extra:
            self._overall_stage = ev.stage
            return int(ev.extra["overall_done"]), int(ev.extra.get("overall_total", ev.total))
        if ev.stage == self._overall_stage:
            return self.state["done"], self.state["total"]
        return ev.done, ev.total

    def __call__(self, ev: ProgressEvent) -> None:
        st = self.state
        new_stage = ev.stage != st["stage"]
        overall_done, overall_total = self._overall(ev)
        st.update(stage=ev.stage, done=overall_done, total=overall_total, message=ev.message)
        if ev.label is not None:
            st["per_class"][ev.label] = {"done": ev.done, "total": ev.total}
        now = time.monotonic()
        if new_stage:
            self._stage_first = (now, overall_done)
        # ETA from this stage's rate since its first event (the first unit's own time is unknown)
        t0, d0 = self._stage_first
        st["eta_s"] = (round((now - t0) / (overall_done - d0) * (overall_total - overall_done), 1)
                       if overall_done > d0 and overall_total >= overall_done else None)
        final = ev.total and ev.done >= ev.total
        if final or new_stage or now - self._last_write >= self.min_interval_s:
            self._last_write = now
            # the job row always gets the latest; the history keeps stage changes, ends and one row a second
            keep = final or new_stage or now - self._last_event >= 1.0
            if keep:
                self._last_event = now
            event = {"stage": ev.stage, "done": ev.done, "total": ev.total, "label": ev.label, "message": ev.message}
            jobs.record_progress(self.db, self.job_id, self.worker, json.loads(json.dumps(st, default=str)),
                                 event if keep else None)


class Worker:
    """Claims and runs jobs. ``start()`` runs lanes in threads; ``run_once(kind)`` runs one job inline (tests)."""

    def __init__(self, settings: Settings, db: Database, store: Store, methods: MethodRegistry,
                 index_registry: IndexRegistry, *, name: str | None = None, device: str | None = None):
        self.settings, self.db, self.store, self.methods = settings, db, store, methods
        self.index_registry = index_registry
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.device = device or settings.device
        self.work_root = Path(settings.data_dir) / "work"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lanes -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.store.clean_staging()
        _remove_old(Path(self.settings.data_dir) / "tmp", older_than_s=3600)  # uploads cut off by a crash
        lanes = [("retrieval", self.settings.num_retrieval_threads),
                 ("generation", self.settings.num_generation_threads)]
        for kind, n in lanes:
            for i in range(n):
                t = threading.Thread(target=self._loop, args=(kind,), name=f"retrogen-{kind}-{i}", daemon=True)
                t.start()
                self._threads.append(t)
        log.info("worker %s started (%s)", self.name, ", ".join(f"{k} x{n}" for k, n in lanes))

    def request_stop(self) -> None:
        """Ask the lanes to stop (signal-handler safe); ``run_forever`` then returns after handing jobs back."""
        self._stop.set()

    def stop(self, timeout_s: float = 30) -> None:
        """Stop claiming; running jobs see a cancel check fail and are handed back to the queue."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=timeout_s)
        self._threads.clear()
        self._stop.clear()  # stopped lanes are gone; run_once / start work again

    def run_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    def _loop(self, kind: str) -> None:
        while not self._stop.is_set():
            try:
                ran = self.run_once(kind)
            except Exception:  # the database may be briefly unavailable: log, wait, retry
                log.exception("worker loop (%s) error", kind)
                ran = False
            if not ran:
                self._stop.wait(self.settings.poll_interval_s)

    # -- one job ---------------------------------------------------------------------------------------------
    def run_once(self, kind: str) -> str | None:
        """Claim one job of ``kind`` and run it to a final state; returns its id, or None if the queue is empty."""
        job = jobs.claim(self.db, kind, self.name, device=self.device, lease_s=self.settings.job_lease_s,
                         max_attempts=self.settings.job_max_attempts)
        if job is None:
            return None
        self._execute(job)
        return job.id

    def _execute(self, job: Job) -> None:
        lost, done = threading.Event(), threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, lost, done), daemon=True)
        beat.start()
        work = self.work_root / job.id
        shutil.rmtree(work, ignore_errors=True)  # a previous attempt's leftovers are never reused
        tracker = ProgressTracker(self.db, job.id, self.name)
        should_cancel = self._cancel_check(job.id, lost)
        t0 = time.monotonic()
        try:
            if should_cancel():
                raise CancelledError("cancelled")
            self.methods.get(job.method).runner(self._context(job, work / "out", tracker, should_cancel))
            self._publish(job, OutputFolder(work / "out"), tracker, should_cancel, t0)
        except _Interrupted:
            if jobs.hand_back(self.db, job.id, self.name):
                log.info("job %s handed back to the queue", job.id)
        except CancelledError:
            jobs.finish(self.db, job.id, self.name, state="cancelled", error=None)
            log.info("job %s cancelled", job.id)
        except RetrogenError as e:
            jobs.finish(self.db, job.id, self.name, state="failed", error=str(e))
            log.info("job %s failed: %s", job.id, e)
        except Exception as e:  # a bug or an environment problem: the job records it, the worker lives on
            log.exception("job %s crashed", job.id)
            # the owner sees the kind of failure only: the message may name server paths or object reprs
            jobs.finish(self.db, job.id, self.name, state="failed",
                        error=f"internal error: the job crashed ({type(e).__name__}); the server log has the details")
        finally:
            done.set()
            beat.join(timeout=5)
            shutil.rmtree(work, ignore_errors=True)

    def _cancel_check(self, job_id: str, lost: threading.Event) -> Callable[[], bool]:
        """The runner's ``should_cancel``: raises on shutdown or a lost lease; reads the flag at most 5x a second."""
        last_check = [0.0]

        def should_cancel() -> bool:
            if lost.is_set() or self._stop.is_set():
                raise _Interrupted("worker stopping or lease lost")
            now = time.monotonic()
            if now - last_check[0] >= 0.2:
                last_check[0] = now
                return jobs.cancel_requested(self.db, job_id)
            return False

        return should_cancel

    def _context(self, job: Job, out_dir: Path, tracker: ProgressTracker,
                 should_cancel: Callable[[], bool]) -> RunContext:
        holdout = (job.params or {}).get("holdout")
        return RunContext(job_id=job.id, dataset_dir=self.store.local_dir(job.dataset_key) if job.dataset_key else None,
                          holdout_dir=self.store.local_dir(holdout["key"]) if holdout else None, out_dir=out_dir,
                          per_class=job.per_class, params=dict(job.params or {}), index_name=job.index_name,
                          model_name=job.model_name, settings=self.settings, index_registry=self.index_registry,
                          store=self.store, progress=tracker, should_cancel=should_cancel,
                          artifacts_dir=Path(self.settings.data_dir) / "artifacts")

    def _publish(self, job: Job, out: OutputFolder, tracker: ProgressTracker, should_cancel: Callable[[], bool],
                 t0: float) -> None:
        """Store a finished output folder and mark the job succeeded (unless cancelled at the last moment)."""
        if not out.is_complete:
            raise RuntimeError(f"method {job.method!r} finished without writing its summary")
        summary, num_images = out.summary(), out.num_records()
        if should_cancel():
            raise CancelledError("cancelled")
        key = self.store.put_tree("results", out.path)
        tracker.state.update(stage="done", eta_s=0)
        ok = jobs.finish(self.db, job.id, self.name, state="succeeded", result_key=key, summary=summary,
                         num_images=num_images, progress=tracker.state)
        log.info("job %s succeeded: %d images in %.1fs%s", job.id, num_images, time.monotonic() - t0,
                 "" if ok else " (but its lease was lost; result discarded)")

    def _heartbeat(self, job_id: str, lost: threading.Event, done: threading.Event) -> None:
        interval = max(0.05, self.settings.job_lease_s / 3)
        while not done.wait(interval):
            try:
                if not jobs.heartbeat(self.db, job_id, self.name, self.settings.job_lease_s):
                    log.warning("job %s: lease lost; stopping it here", job_id)
                    lost.set()
                    return
            except Exception:
                log.exception("job %s: heartbeat failed", job_id)

def _remove_old(folder: Path, older_than_s: float) -> None:
    if not folder.is_dir():
        return
    cutoff = time.time() - older_than_s
    for p in folder.iterdir():
        try:
            if p.stat().st_mtime < cutoff:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        except OSError:
            log.warning("could not remove stale %s", p)
