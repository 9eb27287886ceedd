"""retrogen retrieval: embedders, the index directory, search, and per-class selection with provenance.

Public names load lazily so ``import retrogen.retrieval`` stays cheap (torch, faiss and open_clip load on first use).
"""

from retrogen.lazy import lazy_exports, require_namespace

require_namespace(__name__, "retrogen.retrieval")


_EXPORTS = {
    "create_embedder": ".embedders",
    "list_embedders": ".embedders",
    "Embedder": ".embedders",
    "CorpusIndex": ".index",
    "IndexDirectory": ".index_directory",
    "Manifest": ".index_directory",
    "sync_index": ".index_store",
    "RetrievalError": ".errors",
    "InvalidRetrievalConfigError": ".errors",
    "IndexFormatError": ".errors",
    "IndexNotFoundError": ".errors",
    "IndexStoreError": ".errors",
    "EmbedderMismatchError": ".errors",
    "augment_by_retrieval": ".augment",
    "augment_from_names": ".augment",
    "ItemClassifier": ".safety",
    "RetrievalConfig": ".config",
    "retrieved_item_fields": ".provenance",
    "source_uri": ".provenance",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
