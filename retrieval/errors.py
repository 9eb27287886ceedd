"""Errors the retrieval package raises on purpose; the CLI prints one line, the service maps them to HTTP."""

from retrogen.errors import InvalidInputError, RetrogenError


class RetrievalError(RetrogenError):
    """Base of every retrieval error."""


class IndexFormatError(RetrievalError, InvalidInputError):
    """An index directory is missing, incomplete, of another format version, or corrupt."""

    exit_code = 2
    http_status = 422


class IndexNotFoundError(IndexFormatError):
    """No index directory (or no manifest in it) at the given path."""

    http_status = 404


class EmbedderMismatchError(RetrievalError, InvalidInputError):
    """The query embedder is not the one the index was built with; the message names both."""

    exit_code = 2
    http_status = 422
