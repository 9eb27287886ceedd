"""Errors of the batch index builder: bad settings or sources, refused re-runs, impossible memory budgets."""

from retrogen.errors import InvalidInputError
from retrogen.retrieval.errors import RetrievalError


class IndexBuildError(RetrievalError, InvalidInputError):
    """Base of every index-build error (an InvalidInputError: exit code 2, the operator's input needs fixing)."""


class SourceError(IndexBuildError):
    """A corpus source is missing, of an unknown kind, or lacks a needed column."""


class BuildMismatchError(IndexBuildError):
    """The output folder holds (part of) a build made with other arguments; ``overwrite`` replaces it."""


class MemoryBudgetError(IndexBuildError):
    """No index of the requested kind fits the memory budget; found before any work is done."""
