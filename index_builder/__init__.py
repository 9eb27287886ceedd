"""retrogen index_builder: read a corpus, embed it, write embedding shards + metadata, build the FAISS index.

Public names load lazily so ``import retrogen.index_builder`` (and ``retrogen --help``) stay cheap.
"""

from retrogen.lazy import lazy_exports, require_namespace

require_namespace(__name__, "retrogen.index_builder")


_EXPORTS = {
    "build_index": ".build",
    "import_clip_retrieval": ".importer",
    "plan_index": ".faiss_build",
    "IndexBuildConfig": ".config",
    "IndexBuildError": ".errors",
    "SourceError": ".errors",
    "BuildMismatchError": ".errors",
    "MemoryBudgetError": ".errors",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
