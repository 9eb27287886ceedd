"""The one idiom for library configs (retrieval, generation, evaluation, index build).

A config is a frozen pydantic model: each field carries its default, its constraint (``ge=1``, a
``Literal``...) and a one-line ``description`` that is also its CLI help. Building one with a bad value or
an unknown key raises the library's own ``InvalidInputError`` subclass with one line naming the field, so
the CLI exits 2 and the service answers 422 without either re-checking anything. The CLI options are
derived from the fields (:mod:`retrogen.config_cli`); JSON (service job params) goes through
:meth:`LibraryConfig.from_dict`. One name for kwarg, CLI flag and JSON key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import InvalidInputError


class LibraryConfig(BaseModel):
    """Base of every library config. Subclasses set ``error`` (their library's InvalidInputError) and ``kind``."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    #: raised for every bad value or unknown key
    error: ClassVar[type[InvalidInputError]] = InvalidInputError
    #: what the messages call these settings ("retrieval", "generation", ...)
    kind: ClassVar[str] = "config"

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise self.error(describe_validation_error(e, type(self))) from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build from JSON (a service request's params, a settings file)."""
        if not isinstance(data, Mapping):
            raise cls.error(f"{cls.kind} settings must be a JSON object, got {type(data).__name__}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (tuples as lists); ``from_dict(to_dict())`` gives an equal config."""
        return self.model_dump(mode="json")

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated like a new config."""
        return type(self)(**(self.model_dump() | changes))


def describe_validation_error(error: ValidationError, model: type[LibraryConfig]) -> str:
    """One readable line for the first problem: the field, the value received, and what is wanted."""
    unknown = sorted(str(e["loc"][0]) for e in error.errors() if e["type"] == "extra_forbidden")
    if unknown:
        return (f"unknown {model.kind} setting(s) {unknown}; valid: {', '.join(sorted(model.model_fields))}")
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or model.kind
    message = first["msg"].removeprefix("Value error, ")
    if "input" in first and first["type"] != "missing" and first["loc"]:  # a model-level check has no one value
        return f"{where}={first['input']!r}: {message}"
    return f"{where}: {message}"
