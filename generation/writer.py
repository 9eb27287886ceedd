"""Saving generated images off the generation thread: PNG encoding in a small thread pool, then hashing and
writing (image file + provenance line) by one committer thread in submission order.

The generation loop hands each image to :class:`ImageSink` and goes on denoising the next batch while the last
one is encoded and saved. A bounded queue sits between them: when saving falls behind, ``put`` blocks, so
memory holds at most ``max_pending`` (+2) images whatever the number generated. The output is the same as
saving inline (same bytes, records in the same order): only *when* it happens changes. A failure in saving is
kept and raised by the next ``put`` / ``flush`` / ``close``: the call fails with it, nothing is lost silently.
"""

from __future__ import annotations

import io
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from PIL import Image

from retrogen.outputs import OutputWriter

DEFAULT_THREADS = 2  # PNG encoders (zlib releases the GIL); 0 saves inline on the caller's thread
DEFAULT_MAX_PENDING = 8  # images generated but not yet saved


def to_pil(image: Any) -> Image.Image:
    """A PIL image from a pipeline's ``output_type="np"`` image (H, W, C floats in [0, 1]) as diffusers'
    ``numpy_to_pil`` makes it (same rounding, so the same bytes), or a PIL image as it is."""
    if isinstance(image, Image.Image):
        return image
    arr = (image * 255).round().astype("uint8")
    return Image.fromarray(arr.squeeze(-1), mode="L") if arr.shape[-1] == 1 else Image.fromarray(arr)


def encode_png(image: Any) -> bytes:
    """PNG bytes of a PIL image or an ``output_type="np"`` array (deterministic: same pixels, same bytes)."""
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def _encode_png(image: Any) -> bytes:
    return encode_png(image)


class ImageSink:
    """Saves images through an :class:`OutputWriter`, off the caller's thread (``threads`` > 0) or inline (0).

    ``put`` queues one image with its record fields; ``flush`` waits until all queued ones are written (raising
    the first error); ``close`` flushes and stops the threads. Use it as a context manager: on an exception the
    images already generated are still saved (as inline saving would have), then the exception propagates.
    """

    def __init__(self, writer: OutputWriter, *, threads: int = DEFAULT_THREADS,
                 max_pending: int = DEFAULT_MAX_PENDING, encode: Any = None):
        if threads < 0 or max_pending < 1:
            raise ValueError("threads must be >= 0 and max_pending >= 1")
        self.writer = writer
        self.threads = threads
        self.submitted = 0
        self._encode = encode or _encode_png  # looked up per image, so a test can replace encode_png
        self._error: BaseException | None = None
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None
        self._queue: queue.Queue[tuple[Future, dict[str, Any]] | None] = queue.Queue(maxsize=max_pending)
        self._committer: threading.Thread | None = None
        if threads:
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="retrogen-encode")
            self._committer = threading.Thread(target=self._commit_loop, name="retrogen-writer", daemon=True)
            self._committer.start()

    def put(self, *, label: str, filename: str, image: Any, method: str, fields: dict[str, Any]) -> None:
        """Queue one image (PIL or ``output_type="np"`` array); blocks while ``max_pending`` wait to be saved."""
        self._raise_error()
        if self._closed:
            raise RuntimeError("ImageSink is closed")
        record = {"label": label, "filename": filename, "method": method, "fields": fields}
        self.submitted += 1
        if self._pool is None:
            self.writer.add(image_bytes=self._encode(image), **record)
            return
        self._queue.put((self._pool.submit(self._encode, image), record))

    def _commit_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                future, record = item
                if self._error is None:  # after a failure, queued images are dropped (the call fails anyway)
                    self.writer.add(image_bytes=future.result(), **record)
                else:
                    future.cancel()
            except BaseException as e:  # noqa: BLE001 - kept and raised on the caller's thread
                self._error = e
            finally:
                self._queue.task_done()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def flush(self) -> None:
        """Wait until every queued image is written; raise the first saving error."""
        if self._pool is not None:
            self._queue.join()
        self._raise_error()

    def close(self) -> None:
        """Flush, stop the threads, and raise the first saving error (once closed, nothing more is taken)."""
        if self._closed:
            self._raise_error()
            return
        self._closed = True
        if self._pool is not None and self._committer is not None:
            self._queue.put(None)
            self._committer.join()
            self._pool.shutdown(wait=True)
        self._raise_error()

    def __enter__(self) -> ImageSink:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # save what was generated before the failure; the failure itself is what the caller sees
            self.close()
        except BaseException:  # noqa: BLE001, S110 - the exception already propagating wins
            pass
