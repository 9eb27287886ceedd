"""Dynamic micro-batching: concurrent requests' model inputs become one model call.

A request hands its inputs (preprocessed images, or texts) to a :class:`MicroBatcher` and waits. A few worker
threads per embedder each take the oldest waiting request plus every other one already waiting (up to
``max_items`` inputs), run the model once on all of them, and hand each request its own rows. Nothing waits
for a batch to fill: a lone request runs at once, and under load the requests that arrive while the model is
busy form the next batch, so the batch grows with the load (as Triton's dynamic batcher with no queue
delay). A failing batch is re-run one request at a time, so each request gets its own result or error.

A query route hands over its whole work instead (:class:`BatchWork`: decode before the model, search and answer
after it), so that its one trip off the event loop is the trip to the model's worker and back
(:meth:`MicroBatcher.do_async`); a thread-pool hop first cost ~0.4 ms more per request here
(docs/service-retrieval.md).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class BatchWork(Protocol):
    """One request's work around a batched model call, run in the batcher's worker thread."""

    size: int  # the inputs ``prepare`` returns: what the request adds to a batch

    def prepare(self) -> Any:
        """The model inputs (decoded and preprocessed here, so that an event loop never does it)."""

    def finish(self, rows: np.ndarray) -> Any:
        """The request's answer from its rows of the model's output."""


@dataclass
class _Request:
    items: Any  # an array of stacked inputs, or a list; None until ``work.prepare`` runs
    size: int
    work: BatchWork | None = None
    notify: Callable[[_Request], None] | None = None  # how an event loop learns it is done
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None

    def settle(self) -> None:
        self.done.set()
        if self.notify is not None:
            self.notify(self)


def _resolve(future: asyncio.Future, request: _Request) -> None:
    if future.done():  # the caller went away (cancelled): nobody reads the answer
        return
    if request.error is not None:
        future.set_exception(request.error)
    else:
        future.set_result(request.result)


class MicroBatcher:
    """Runs ``run(join(inputs of several requests))`` and splits its rows back, request by request.

    Args:
        run: the model call on a batch (rows out in the order of the inputs in).
        join: how the inputs of several requests make one batch (``np.concatenate``, list concatenation).
        workers: model calls that may run at once (each on its own batch).
        max_items: inputs per model call, at most (a request larger than that runs alone).
    """

    def __init__(self, run: Callable[[Any], np.ndarray], *, join: Callable[[list[Any]], Any], workers: int = 1,
                 max_items: int = 64, name: str = "batcher"):
        self.run, self.join, self.max_items, self.name = run, join, max_items, name
        self.workers = max(1, workers)
        self.calls = 0  # model calls made: what a test (or a metric) can read
        self._queue: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._started = False
        self._lock = threading.Lock()

    def __call__(self, items: Any) -> np.ndarray:
        """The model's rows for ``items``, batched with other callers' (blocks this thread)."""
        if len(items) == 0:
            return self.run(items)
        return self._wait(_Request(items, len(items)))

    def do(self, work: BatchWork) -> Any:
        """``work.finish(rows)``, with ``work.prepare()`` and the batched model call between, all in a worker."""
        return self._wait(_Request(None, work.size, work))

    async def do_async(self, work: BatchWork) -> Any:
        """As :meth:`do`, awaited on an event loop: the loop is told through ``call_soon_threadsafe``."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def notify(request: _Request) -> None:
            try:
                loop.call_soon_threadsafe(_resolve, future, request)
            except RuntimeError:  # the loop closed meanwhile (shutdown): nobody waits any more
                pass

        self._put(_Request(None, work.size, work, notify))
        return await future

    def _wait(self, request: _Request) -> Any:
        self._put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def _put(self, request: _Request) -> None:
        with self._lock:
            if not self._started:
                for n in range(self.workers):
                    threading.Thread(target=self._loop, name=f"{self.name}-{n}", daemon=True).start()
                self._started = True
        self._queue.put(request)

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            size = batch[0].size
            while size < self.max_items:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(nxt)
                size += nxt.size
            self._serve(batch)

    def _serve(self, batch: list[_Request]) -> None:
        """Prepare, one model call, finish; each request's own error stays its own, and every request is
        settled whatever happens."""
        try:
            ready = [r for r in batch if _step(r, _prepare)]
            if ready:
                self._run(ready)
            for r in ready:
                if r.error is None and r.work is not None:
                    _step(r, _finish)
        finally:
            for r in batch:
                r.settle()

    def _run(self, batch: Sequence[_Request]) -> None:
        try:
            self.calls += 1
            out = self.run(self.join([r.items for r in batch]) if len(batch) > 1 else batch[0].items)
            at = 0
            for r in batch:
                r.result, at = out[at : at + len(r.items)], at + len(r.items)
        except Exception as e:  # noqa: BLE001 - the request's own error is handed to it below
            if len(batch) > 1:  # find whose input fails: each request alone
                for r in batch:
                    self._run([r])
                return
            batch[0].error = e


def _prepare(r: _Request) -> None:
    if r.work is not None:
        r.items = r.work.prepare()


def _finish(r: _Request) -> None:
    r.result = r.work.finish(r.result)


def _step(r: _Request, fn: Callable[[_Request], None]) -> bool:
    """``fn(r)``, its exception kept as the request's error; True when it succeeded."""
    try:
        fn(r)
        return True
    except Exception as e:  # noqa: BLE001 - handed to the request's caller
        r.error = e
        return False


def concat_lists(parts: list[list[str]]) -> list[str]:
    return [x for part in parts for x in part]


@dataclass
class EmbedBatchers:
    """One embedder's image and text batchers, shared by every index that uses the embedder."""

    images: MicroBatcher
    texts: MicroBatcher

    @classmethod
    def of(cls, embedder, *, workers: int) -> EmbedBatchers:
        name = getattr(embedder, "name", "embedder")
        return cls(MicroBatcher(lambda batch: embedder.embed_preprocessed(batch), join=np.concatenate,
                                workers=workers, name=f"{name}-images"),
                   MicroBatcher(lambda texts: embedder.embed_texts(texts), join=concat_lists, workers=workers,
                                name=f"{name}-texts"))
