"""retrogen retrieval: embedders, the on-disk index, search, and per-class selection with provenance.

Public names load lazily so ``import retrieval`` stays cheap (torch, faiss and open_clip load on first use).
"""

import retrogen  # noqa: F401  (sets OMP_WAIT_POLICY before torch/faiss load)
from retrogen.lazy import lazy_exports

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
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
