"""HTTP-flavoured errors of the service, all ``RetrogenError``s so the one exception handler maps them."""

from __future__ import annotations

from retrogen.errors import InvalidInputError, NotFoundError, RetrogenError

__all__ = ["UnauthorizedError", "ForbiddenError", "ConflictError", "PayloadTooLargeError", "InvalidInputError",
           "NotFoundError"]


class UnauthorizedError(RetrogenError):
    """No or an unknown API key."""

    exit_code = 2
    http_status = 401


class ForbiddenError(RetrogenError):
    """The request asks for something this server does not allow (e.g. a path outside the configured root)."""

    exit_code = 2
    http_status = 403


class ConflictError(RetrogenError):
    """The resource is in a state that does not allow the request (e.g. results of an unfinished job)."""

    exit_code = 2
    http_status = 409


class PayloadTooLargeError(InvalidInputError):
    """An upload or a dataset exceeds a configured size limit."""

    http_status = 413
