"""Errors of the batch index builder: bad sources, refused re-runs, impossible memory budgets."""

from retrogen.errors import InvalidInputError
from retrogen.retrieval.errors import RetrievalError


class IndexBuildError(RetrievalError, InvalidInputError):
    """Base of every index-build error (exit code 2: the operator's input needs fixing)."""

    exit_code = 2
    http_status = 422


class SourceError(IndexBuildError):
    """A corpus source is missing, of an unknown kind, or lacks a needed column."""


class BuildMismatchError(IndexBuildError):
    """The output folder holds (part of) a build made with other arguments; ``overwrite`` replaces it."""


class MemoryBudgetError(IndexBuildError):
    """No index of the requested kind fits the memory budget; found before any work is done."""
