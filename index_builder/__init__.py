"""retrogen index_builder: read a corpus, embed it, write embedding shards + metadata, build the FAISS index.

Public names load lazily so ``import index_builder`` (and ``retrogen --help``) stay cheap.
"""

import retrogen  # noqa: F401  (sets OMP_WAIT_POLICY before torch/faiss load)
from retrogen.lazy import lazy_exports

_EXPORTS = {
    "build_index": "index_builder.build",
    "import_clip_retrieval": "index_builder.importer",
    "plan_index": "index_builder.faiss_build",
    "IndexBuildError": "index_builder.errors",
    "SourceError": "index_builder.errors",
    "BuildMismatchError": "index_builder.errors",
    "MemoryBudgetError": "index_builder.errors",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
