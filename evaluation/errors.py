"""Errors of the evaluation package; the CLI prints each as one line (exit code 2), the service maps them to 422."""

from __future__ import annotations

from retrogen.errors import InvalidInputError, RetrogenError


class EvaluationError(RetrogenError):
    """Base of the errors ``evaluation`` raises on purpose."""


class InvalidEvaluationError(EvaluationError, InvalidInputError):
    """A bad argument or dataset (unknown classes, empty sets, bad ratio...)."""


class LeakageError(InvalidEvaluationError):
    """Test images near-duplicate augmentation images; ``leaks`` names each pair."""

    def __init__(self, leaks: list[dict], threshold: float):
        self.leaks = leaks
        self.threshold = threshold
        shown = "; ".join(f"{x['test']} ~ {x['set']}:{x['image']} (cos {x['similarity']:.3f})" for x in leaks[:5])
        more = f" and {len(leaks) - 5} more" if len(leaks) > 5 else ""
        super().__init__(
            f"{len(leaks)} test image(s) near-duplicate augmentation images (cosine >= {threshold}): {shown}{more}; "
            "remove them from the augmentation set (or the test set) so the test measures generalisation"
        )
