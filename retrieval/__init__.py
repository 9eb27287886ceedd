"""retrogen retrieval: embedders, the on-disk index, search, and per-class selection with provenance.

Public names load lazily so ``import retrieval`` stays cheap (torch, faiss and open_clip load on first use).
"""

import importlib

import retrogen  # noqa: F401  (sets OMP_WAIT_POLICY before torch/faiss load)

_EXPORTS = {
    "create_embedder": "retrieval.embedders",
    "list_embedders": "retrieval.embedders",
    "Embedder": "retrieval.embedders",
    "CorpusIndex": "retrieval.index",
    "Manifest": "retrieval.index_format",
    "read_manifest": "retrieval.index_format",
    "RetrievalError": "retrieval.errors",
    "IndexFormatError": "retrieval.errors",
    "IndexNotFoundError": "retrieval.errors",
    "EmbedderMismatchError": "retrieval.errors",
    "augment_by_retrieval": "retrieval.augment",
    "RetrievalConfig": "retrieval.augment",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
