"""The root of every retrogen error.

Each library defines its own base (``RetrievalError``, ``GenerationError``, ...) deriving from
:class:`RetrogenError`, and a few named subclasses. The CLI turns any ``RetrogenError`` into one readable
line and ``exit_code``; the service maps them to HTTP statuses via ``http_status``.
"""


class RetrogenError(Exception):
    """Base of all errors retrogen raises on purpose. The message is meant for the user."""

    exit_code = 1
    http_status = 500


class InvalidInputError(RetrogenError, ValueError):
    """The caller's input is wrong (bad argument, bad file, bad layout)."""

    exit_code = 2
    http_status = 422


class NotFoundError(RetrogenError, LookupError):
    """A named thing (index, model, dataset, file) does not exist."""

    exit_code = 2
    http_status = 404


class UnknownComponentError(InvalidInputError):
    """An unknown registry name; the message lists the valid ones."""

    def __init__(self, kind: str, name: str, valid: list[str]):
        self.kind, self.name, self.valid = kind, name, list(valid)
        super().__init__(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid)) or '(none)'}")
