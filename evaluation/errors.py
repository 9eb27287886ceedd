"""Errors of the evaluation package; the CLI prints each as one line (exit code 2), the service maps them to 422."""

from __future__ import annotations

from retrogen.errors import InvalidInputError, RetrogenError

#: pairs a LeakageError's message names; all of them are in its ``leaks`` (and leaks.json when written)
SHOWN_PAIRS = 20


class EvaluationError(RetrogenError):
    """Base of the errors ``evaluation`` raises on purpose."""


class InvalidEvaluationError(EvaluationError, InvalidInputError):
    """A bad argument or dataset (unknown classes, empty sets, bad ratio...)."""


class LeakageError(InvalidEvaluationError):
    """Training or augmentation images copy test images; ``leaks`` holds every pair."""

    def __init__(self, leaks: list[dict], *, written_to: str | None = None):
        self.leaks = leaks
        shown = "; ".join(f"{x['set']}:{x['image']} ~ test:{x['test']} ({x['kind']}"
                          + (f", residual {x['residual']:.3f})" if x["kind"] == "near" else ")")
                          for x in leaks[:SHOWN_PAIRS])
        rest = len(leaks) - SHOWN_PAIRS
        where = f" (all pairs in {written_to})" if written_to else ""
        more = f"; and {rest} more{where}" if rest > 0 else where
        super().__init__(
            f"{len(leaks)} image pair(s) copy test images: {shown}{more}. Remove the copies so the test measures "
            "generalisation, or pass leak_policy=exclude (--leak-policy exclude) to drop them from every arm"
        )
