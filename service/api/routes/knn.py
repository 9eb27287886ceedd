"""clip-retrieval's back-end API (``/knn-service``, ``/indices-list``, ``/metadata``) with its JSON shapes.

clip-retrieval's ``ClipClient`` and front-end work against retrogen unchanged (shapes from clip-retrieval 2.45.0
``clip_back.py``/``clip_client.py``). The client posts a JSON string with no content type, so bodies are parsed
as JSON whatever the header says (Flask's ``get_json(force=True)``). Differences, each on purpose:

- ``image_url`` is refused (403): fetching arbitrary URLs from the server is an SSRF hole. Send ``image``.
- ``modality: "text"`` (search caption embeddings) is refused: retrogen indexes hold image embeddings only.
- ``use_safety_model`` drops items whose corpus ``punsafe`` score is above 0.5 when the corpus has the scores,
  else runs the index's configured ``safety_classifier``; ``use_violence_detector`` runs a zero-shot CLIP
  violence detector (as clip-retrieval's does) on image-text indexes. A flag this index cannot serve is
  named in the response header ``X-Retrogen-Unavailable`` and the results are not filtered by it. The
  aesthetic re-weighting is not offered (``X-Retrogen-Ignored: aesthetic_score``). Items the corpus marks
  opted out are never returned.
- With API keys on, the key may also come as ``?api_key=`` in the URL, since ClipClient sends no headers.
- ``url`` falls back to this server's image URL when the corpus row has none; ``image_url`` is always there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from retrogen.errors import InvalidInputError, NotFoundError

from ...core.errors import ForbiddenError
from ...domain.indexes import IndexRegistry, LoadedIndex
from ...domain.queries import QueryLimits, clip_client_screen, decode_base64_image
from ..deps import KEY_SECURITY, QueryContextKeyInUrlDep
from ..errors import documented
from ..lean_route import lean_post
from .retrieve import item_image_urls

# ClipClient sends no headers: the key may also come as ?api_key= in its URL.
# every route checks the key through its QueryContextKeyInUrlDep (one dependency: see deps.query_context)
router = APIRouter(tags=["clip-retrieval compatible"])

#: clip-retrieval's dedup threshold (``get_non_uniques``): cosine >= 0.94 means the same image
DEDUP_THRESHOLD = 0.94
MAX_METADATA_IDS = 1000


class ImageUrlRefusedError(ForbiddenError):
    """``image_url`` asks the server to fetch a URL on the client's behalf (SSRF)."""


class KnnQuery(BaseModel):
    """``ClipClient`` sends every key, most as null; unknown keys are ignored as clip-retrieval does."""

    model_config = ConfigDict(extra="ignore")

    text: str | None = Field(None, max_length=10_000)
    image: str | None = Field(None, description="base64-encoded image file")
    image_url: str | None = Field(None, description="refused: server-side fetching is disabled (SSRF)")
    embedding_input: list[float] | None = Field(None, max_length=16_384)
    modality: Literal["image", "text"] = "image"
    num_images: int = Field(40, ge=1)
    num_result_ids: int | None = Field(None, ge=1)
    indice_name: str | None = None
    use_mclip: bool = False
    deduplicate: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: int | str | None = None
    aesthetic_weight: float | str | None = None


class MetadataQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ids: list[int] = Field(default_factory=list, max_length=MAX_METADATA_IDS)
    indice_name: str | None = None


async def _json_body(request: Request, model: type[BaseModel]) -> Any:
    """The body as ``model``, parsed as JSON whatever its content type says (ClipClient sends none), in one
    pass by pydantic-core."""
    try:
        return model.model_validate_json(await request.body() or b"{}")
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        if errors[0]["type"] == "json_invalid":  # not UTF-8, not JSON, absurd nesting
            raise InvalidInputError(f"request body is not JSON: {errors[0]['ctx']['error']}") from None
        errs = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'body'}: {x['msg']}" for x in errors[:5])
        raise InvalidInputError(f"invalid request: {errs}") from None


def _schema(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": model.model_json_schema()}}}}


@router.get("/indices-list", summary="Configured index names (clip-retrieval)", response_model=list[str],
            openapi_extra=KEY_SECURITY)
def indices_list(query: QueryContextKeyInUrlDep) -> list[str]:
    return query.registry.names()


@lean_post(router, "/knn-service", summary="k nearest corpus images (clip-retrieval)",
           openapi_extra=_schema(KnnQuery) | KEY_SECURITY,
           response_model=list[dict[str, Any]], responses=documented(403, 404))
async def knn_service(request: Request, query: QueryContextKeyInUrlDep) -> Response:
    # As /v1/retrieve: checks on the event loop, the rest in the embedder's worker (KnnWork).
    q: KnnQuery = await _json_body(request, KnnQuery)
    check_knn(q, query.limits)
    loaded = await query.registry.get_async(q.indice_name)
    work = KnnWork(q, loaded, query.registry, query.limits, item_image_urls(request, loaded.name))
    return knn_response(q, work, await loaded.answer_async(work))


def answer_knn(q: KnnQuery, request: Request, registry: IndexRegistry, limits: QueryLimits) -> Response:
    """The route's work and its answer, HTTP aside, from any thread (the benchmark's in-process side)."""
    check_knn(q, limits)
    loaded = registry.get(q.indice_name)
    work = KnnWork(q, loaded, registry, limits, item_image_urls(request, loaded.name))
    return knn_response(q, work, loaded.answer(work))


def check_knn(q: KnnQuery, limits: QueryLimits) -> None:
    """What needs no index or model: refused before either is touched."""
    if result_ids(q) > limits.max_k:
        raise InvalidInputError(f"num_images and num_result_ids must be <= {limits.max_k}, got {result_ids(q)}")
    if q.use_mclip:
        raise InvalidInputError("use_mclip is not supported: no multilingual CLIP is loaded on this server")
    if q.modality == "text":
        raise InvalidInputError("modality 'text' searches caption embeddings, which retrogen indexes do not hold; "
                                "use modality 'image' (text queries are matched against image embeddings)")


def result_ids(q: KnnQuery) -> int:
    """How many neighbours to search for (``num_result_ids``, at least ``num_images``), before dedup."""
    return max(q.num_result_ids or q.num_images, q.num_images)


def knn_response(q: KnnQuery, work: KnnWork, body: bytes) -> Response:
    answer = Response(content=body, media_type="application/json")
    if q.aesthetic_score not in (None, "") and q.aesthetic_weight not in (None, "", 0, 0.0):
        answer.headers["X-Retrogen-Ignored"] = "aesthetic_score"
    if work.unavailable:
        answer.headers["X-Retrogen-Unavailable"] = ",".join(work.unavailable)
    return answer


class KnnWork:
    """One query's work (a ``QueryWork``): which input to embed is settled when made, in clip-retrieval's
    precedence (text, then image / image_url, then embedding_input); decoding (``prepare``), search and the rows
    (``finish``) run in the embedder's worker."""

    def __init__(self, q: KnnQuery, loaded: LoadedIndex, registry: IndexRegistry, limits: QueryLimits,
                 image_url: Callable[[int], str]):
        self.q, self.loaded, self.limits, self.image_url = q, loaded, limits, image_url
        self.safety_classifier = registry.configs[loaded.name].safety_classifier
        self.size, self.vector, self.unavailable, self.screen = 1, None, [], None
        if q.text:
            self.model = "texts"
        elif q.image is not None:
            self.model = "images"
        elif q.image_url is not None:
            raise ImageUrlRefusedError("image_url is refused: this server does not fetch URLs on a client's behalf "
                                       "(SSRF risk); send the image itself, base64-encoded, in 'image'")
        elif q.embedding_input is not None:
            self.model, self.vector = None, query_vector(q.embedding_input, loaded)
        else:
            raise InvalidInputError("must fill one of text, image, image_url and embedding_input")

    def prepare(self) -> Any:
        """The screen the flags ask for, as this index can serve them; the model's input (or the query vector)."""
        q = self.q
        self.screen, self.unavailable = clip_client_screen(
            self.loaded, use_safety_model=q.use_safety_model, use_violence_detector=q.use_violence_detector,
            safety_classifier=self.safety_classifier)
        if self.model == "texts":
            return [q.text]
        if self.model == "images":
            return self.loaded.preprocess([decode_base64_image(q.image, what="image", limits=self.limits)[0]])
        return self.vector

    def finish(self, vec: np.ndarray) -> bytes:
        """Search (screened), drop near-duplicates as clip-retrieval does: the rows as JSON."""
        q, loaded = self.q, self.loaded
        if self.screen is None:
            hits = loaded.neighbours(vec, result_ids(q))[0]
        else:
            hits = loaded.screened_neighbours(vec, result_ids(q), self.screen)[0][0]
        if q.deduplicate and len(hits) > 1:
            keep = dedup_keep(loaded.corpus.embeddings([h.id for h in hits]))
            hits = [h for h, k in zip(hits, keep, strict=True) if k]
        out = []
        for h in hits[: q.num_images]:
            row = _public_meta(loaded, h.meta, self.image_url(h.id))
            row["id"] = h.id
            row["similarity"] = h.similarity
            out.append(row)
        return ROWS.dump_json(out)  # pydantic, once: no response-model validation or jsonable_encoder walk


def query_vector(values: list[float], loaded: LoadedIndex) -> np.ndarray:
    """``embedding_input`` as a unit query row, or InvalidInputError."""
    vec = np.asarray(values, np.float32)[None, :]
    if vec.shape[1] != loaded.dim:
        raise InvalidInputError(f"embedding_input has {vec.shape[1]} values; index {loaded.name!r} has "
                                f"dimension {loaded.dim}")
    norm = float(np.linalg.norm(vec))
    if not np.isfinite(norm) or norm == 0:
        raise InvalidInputError("embedding_input must be a finite, non-zero vector")
    return vec / norm


ROWS = TypeAdapter(list[dict[str, Any]])


def dedup_keep(embeddings) -> list[bool]:
    """clip-retrieval's connected-components dedup: of each group linked by cosine >= 0.94, keep the best ranked."""
    from retrogen.retrieval.embedders import l2_normalize

    e = l2_normalize(embeddings)
    n = len(e)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(e @ e.T >= DEDUP_THRESHOLD, k=1)), strict=True):
        a, b = find(int(i)), find(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)  # the root is always the smallest (best-ranked) member
    return [find(i) == i for i in range(n)]


def _public_meta(loaded: LoadedIndex, meta: dict[str, Any], served_url: str) -> dict[str, Any]:
    """The metadata columns a client may see (``source_uri`` relative to the corpus source: no server path)."""
    return {
        "url": meta.get("url") or served_url,
        "caption": meta.get("caption"),
        "image_url": served_url,
        "key": meta.get("key"),
        "source_uri": loaded.public_source_uri(meta),
        "licence": meta.get("licence"),
        "width": meta.get("width"),
        "height": meta.get("height"),
        "sha256": meta.get("sha256"),
    }


@router.post("/metadata", summary="Metadata rows by id (clip-retrieval)",
             openapi_extra=_schema(MetadataQuery) | KEY_SECURITY,
             response_model=list[dict[str, Any]], responses=documented(404))
async def metadata(request: Request, query: QueryContextKeyInUrlDep) -> list[dict[str, Any]]:
    from starlette.concurrency import run_in_threadpool

    q: MetadataQuery = await _json_body(request, MetadataQuery)
    if not q.ids:
        return []
    return await run_in_threadpool(_metadata, q, request, query.registry)


def _metadata(q: MetadataQuery, request: Request, registry: IndexRegistry) -> list[dict[str, Any]]:
    loaded: LoadedIndex = registry.get(q.indice_name)
    bad = [i for i in q.ids if not 0 <= i < loaded.ntotal]
    if bad:
        raise NotFoundError(f"index {loaded.name!r} has ids 0..{loaded.ntotal - 1}; unknown: {bad[:10]}")
    metas = {int(m["id"]): m for m in loaded.corpus.metadata(sorted(set(q.ids)))}
    image_url = item_image_urls(request, loaded.name)
    return [{"id": i, "metadata": _public_meta(loaded, metas.get(i, {}), image_url(i))} for i in q.ids]
