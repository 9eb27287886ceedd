"""Dynamic micro-batching: concurrent requests' model inputs become one model call.

A request hands its inputs (preprocessed images, or texts) to a :class:`MicroBatcher` and waits. A few worker
threads per embedder each take the oldest waiting request plus every other one already waiting (up to
``max_items`` inputs), run the model once on all of them, and hand each request its own rows. Nothing waits
for a batch to fill: a lone request runs at once, and under load the requests that arrive while the model is
busy form the next batch, so the batch grows with the load (as Triton's dynamic batcher with no queue
delay). A failing batch is re-run one request at a time, so each request gets its own result or error.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class _Request:
    items: Any  # an array of stacked inputs, or a list
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None


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
        if len(items) == 0:
            return self.run(items)
        self._start()
        request = _Request(items)
        self._queue.put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def _start(self) -> None:
        with self._lock:
            if not self._started:
                for n in range(self.workers):
                    threading.Thread(target=self._loop, name=f"{self.name}-{n}", daemon=True).start()
                self._started = True

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            size = len(batch[0].items)
            while size < self.max_items:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(nxt)
                size += len(nxt.items)
            self._run(batch)

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
        finally:  # every request of the batch has its result or its error by now
            for r in batch:
                r.done.set()


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
