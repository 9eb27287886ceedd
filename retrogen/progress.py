"""Progress reporting and cancellation shared by long-running library calls.

Libraries take an optional ``progress`` callback and an optional ``should_cancel`` predicate as
arguments; the CLI wires them to tqdm bars, the service to job rows in its database.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import RetrogenError


@dataclass(frozen=True)
class ProgressEvent:
    """``done`` of ``total`` units finished in ``stage`` (for ``label``, when per class)."""

    stage: str
    done: int
    total: int
    label: str | None = None
    message: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


ProgressFn = Callable[[ProgressEvent], None]
CancelFn = Callable[[], bool]


class CancelledError(RetrogenError):
    """The caller asked to stop (``should_cancel()`` returned True)."""

    exit_code = 130
    http_status = 409


def emit(progress: ProgressFn | None, event: ProgressEvent) -> None:
    if progress is not None:
        progress(event)


def check_cancel(should_cancel: CancelFn | None) -> None:
    if should_cancel is not None and should_cancel():
        raise CancelledError("cancelled")
