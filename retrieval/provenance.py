"""The provenance fields of a retrieved corpus item, built in one place.

``augment_by_retrieval`` records them for every image it writes (plus the filters it passed and its media
type), and the service's ``/v1/retrieve`` returns them for every neighbour (plus its index name and method),
so an item is described the same way wherever it comes from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .index import CorpusIndex


def _score(value: float | None) -> float | None:
    """A stored float32 score as written (0.1, not 0.10000000149)."""
    return None if value is None else round(float(value), 6)


def source_uri(meta: dict[str, Any]) -> str | None:
    """Where the item's bytes are: the file, or ``tar#member`` for a webdataset member."""
    source = meta.get("source")
    return f"{source}#{meta['member']}" if meta.get("member") else source


def retrieved_item_fields(corpus: CorpusIndex, meta: dict[str, Any], *, sample_id: int, similarity: float,
                          rank: int, query: dict[str, Any], embedder_name: str) -> dict[str, Any]:
    """What is known about corpus row ``sample_id`` (``meta``: its metadata row) and how it was found."""
    return {
        "index_id": corpus.manifest.index_id,
        "index_version": corpus.manifest.version,
        "sample_id": int(sample_id),
        "sample_key": meta.get("key"),
        "source_uri": source_uri(meta),
        "caption": meta.get("caption"),
        "url": meta.get("url"),
        "licence": meta.get("licence"),
        # what the corpus says of the item's rights and safety (None where its metadata has no such column)
        "opt_out": meta.get("opt_out"),
        "status": meta.get("status"),
        "punsafe": _score(meta.get("punsafe")),
        "pwatermark": _score(meta.get("pwatermark")),
        "nsfw": meta.get("nsfw"),
        "corpus_sha256": meta.get("sha256"),
        "width": meta.get("width"),
        "height": meta.get("height"),
        "query": query,
        "similarity": round(float(similarity), 6),
        "rank": int(rank),
        "embedder": embedder_name,
    }
