"""Errors the generation backend raises on purpose; each message says what to change.

``OutputExistsError`` is the output folder's own (:mod:`retrogen.outputs`), re-exported for old imports.
"""

from __future__ import annotations

from retrogen.errors import InvalidInputError, NotFoundError, RetrogenError, UnknownComponentError
from retrogen.outputs import OutputExistsError

__all__ = [
    "GenerationError", "GpuOutOfMemoryError", "InvalidConfigError", "MethodNeedsImagesError", "ModelKindError",
    "OutputExistsError", "UnknownMethodError", "UnknownModelError", "UnknownSchedulerError",
]


class GenerationError(RetrogenError):
    """Base of every error raised by the ``generation`` package."""


class UnknownModelError(GenerationError, NotFoundError):
    """The model is neither an existing local directory nor a reachable hub id."""


class ModelKindError(GenerationError, InvalidInputError):
    """A directory exists but is not a diffusers Stable Diffusion model directory."""


class UnknownSchedulerError(GenerationError, UnknownComponentError):
    """An unknown scheduler name; the message lists the valid ones."""

    def __init__(self, name: str, valid: list[str]):
        UnknownComponentError.__init__(self, "scheduler", name, valid)


class UnknownMethodError(GenerationError, UnknownComponentError):
    """An unknown generation method; the message lists the valid ones."""

    def __init__(self, name: str, valid: list[str]):
        UnknownComponentError.__init__(self, "generation method", name, valid)


class InvalidConfigError(GenerationError, InvalidInputError):
    """A generation setting has an unusable value (the message names it)."""


class MethodNeedsImagesError(GenerationError, InvalidInputError):
    """The method is conditioned on or trained from the user's images, and a class has none."""


class GpuOutOfMemoryError(GenerationError):
    """CUDA ran out of memory; the message names the setting to lower."""

    exit_code = 3
    http_status = 507

    def __init__(self, during: str, hint: str):
        self.during, self.hint = during, hint
        super().__init__(f"GPU out of memory while {during}; {hint}")
