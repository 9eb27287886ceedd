"""retrogen retrieval: embedders, the on-disk index, search, and per-class selection with provenance.

Public names load lazily so ``import retrogen.retrieval`` stays cheap (torch, faiss and open_clip load on first use).
"""

from retrogen.lazy import lazy_exports, require_namespace

require_namespace(__name__, "retrogen.retrieval")


_EXPORTS = {
    "create_embedder": ".embedders",
    "list_embedders": ".embedders",
    "Embedder": ".embedders",
    "CorpusIndex": ".index",
    "Manifest": ".index_format",
    "read_manifest": ".index_format",
    "RetrievalError": ".errors",
    "IndexFormatError": ".errors",
    "IndexNotFoundError": ".errors",
    "EmbedderMismatchError": ".errors",
    "augment_by_retrieval": ".augment",
    "RetrievalConfig": ".augment",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
