"""Errors the retrieval package raises on purpose; the CLI prints one line, the service maps them to HTTP.

Those that derive from ``InvalidInputError`` inherit its exit code 2 and HTTP 422.
"""

from retrogen.errors import InvalidInputError, RetrogenError


class RetrievalError(RetrogenError):
    """Base of every retrieval error."""


class InvalidRetrievalConfigError(RetrievalError, InvalidInputError):
    """A retrieval setting has a bad value, or is unknown; the message names it."""


class IndexFormatError(RetrievalError, InvalidInputError):
    """An index directory is missing, incomplete, of another format version, or corrupt."""


class IndexNotFoundError(IndexFormatError):
    """No index directory (or no manifest in it) at the given path."""

    http_status = 404


class EmbedderMismatchError(RetrievalError, InvalidInputError):
    """The query embedder is not the one the index was built with; the message names both."""


class IndexStoreError(RetrievalError):
    """An index's URL cannot be used: unknown protocol or missing package, missing bucket, no credentials, an
    unreachable store. The message names the URL (credentials removed); the operator fixes the URL or access."""

    exit_code = 2
    http_status = 503
