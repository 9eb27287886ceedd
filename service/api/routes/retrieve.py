"""Synchronous retrieval for interactive use: ``POST /v1/retrieve`` and the stored corpus images.

Queries are base64 images and/or texts; each gets its ``k`` nearest corpus items with the same provenance
fields an augmentation job records, plus a URL that serves the item's bytes exactly as stored.
``/v1/retrieve`` is ``async``: its work runs in the embedder's batch worker (``LoadedIndex.answer_async``), not in
FastAPI's thread pool, so a request leaves the event loop once; it is a ``LeanRoute`` (key, then body, then the
endpoint, without FastAPI's general handler). The stored-image route is plain ``def``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from retrogen.errors import InvalidInputError, NotFoundError
from retrogen.fileio import media_type, sha256_bytes
from retrogen.retrieval.provenance import retrieved_item_fields

from ...domain.indexes import Hit, IndexRegistry, LoadedIndex
from ...domain.queries import SCREEN_FIELDS, QueryLimits, decode_base64_image, query_screen
from ..deps import KEY_SECURITY, IndexRegistryDep, QueryContextDep, current_key, current_key_or_query
from ..errors import documented
from ..lean_route import lean_post

# Every route needs the caller's API key when keys are on (401 otherwise). The item image may take it as
# ?api_key= too: ClipClient users (and <img src>) fetch the image_url of a result bare.
router = APIRouter(tags=["retrieval"])
KEY = [Depends(current_key)]


class RetrieveRequest(BaseModel):
    """Images (base64 or ``data:`` URLs) and/or texts; results come back images first, then texts."""

    model_config = ConfigDict(extra="forbid")

    index: str | None = Field(None, description="configured index name; default: the first configured")
    images: list[str] = Field(default_factory=list, description="base64-encoded image files (PNG, JPEG, ...)")
    texts: list[Annotated[str, Field(min_length=1, max_length=2000)]] = Field(default_factory=list)
    k: int = Field(10, ge=1, description="neighbours per query")
    nprobe: int | None = Field(None, ge=1, le=1_000_000, description="IVF cells to visit (IVF indexes)")
    ef_search: int | None = Field(None, ge=1, le=1_000_000, description="HNSW search depth (HNSW indexes)")
    rerank_k_factor: int | None = Field(None, ge=1, le=1000, description="exact re-rank depth x k (lossy indexes)")
    # Screening (RetrievalConfig's fields of the same names): excluded items are skipped and the search goes
    # deeper, so each query still gets k where the corpus has them; QueryResult.removed counts them.
    opt_out: list[Annotated[str, Field(min_length=1, max_length=2048)]] = Field(
        default_factory=list, max_length=10_000, description="source URLs, sha256 hashes or domains never returned")
    respect_corpus_opt_out: bool = Field(True, description="skip items the corpus marks opted out")
    max_punsafe: float | None = Field(None, ge=0.0, le=1.0, description="skip items whose punsafe is above this")
    max_pwatermark: float | None = Field(None, ge=0.0, le=1.0, description="skip items whose pwatermark is above")
    nsfw_exclude: list[Annotated[str, Field(min_length=1, max_length=32)]] = Field(
        default_factory=list, max_length=8, description="skip items with these NSFW tags (LAION: NSFW, UNSURE)")
    safety_classifier: str | None = Field(None, max_length=200, description="zero-shot:violence | zero-shot:nsfw "
                                          "| an operator-allowed classifier; skip items it scores >= threshold")
    safety_threshold: float = Field(0.5, ge=0.0, le=1.0)


class Neighbour(BaseModel):
    rank: int
    sample_id: int
    similarity: float
    caption: str | None = None
    url: str | None = None
    source_uri: str | None = None
    image_url: str
    provenance: dict[str, Any]


class QueryResult(BaseModel):
    query: dict[str, Any]
    neighbours: list[Neighbour]
    removed: dict[str, int] = Field(default_factory=dict, description="items above the k-th skipped, by reason")


class RetrieveResponse(BaseModel):
    index: str
    index_id: str
    embedder: str
    k: int
    duration_ms: float
    results: list[QueryResult]
    screening: dict[str, Any] | None = None


class IndexInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    loaded: bool
    embedder: str | None = None


class IndexesPublic(BaseModel):
    data: list[IndexInfo]
    count: int


@router.get("/v1/indexes", response_model=IndexesPublic, summary="Configured corpus indexes", dependencies=KEY)
def list_indexes(registry: IndexRegistryDep) -> IndexesPublic:
    """Every configured index; facts from the manifest for those already loaded (listing loads nothing)."""
    data = [IndexInfo(**d) for d in registry.describe()]
    return IndexesPublic(data=data, count=len(data))


@lean_post(router, "/v1/retrieve", response_model=RetrieveResponse, summary="k nearest corpus images per query",
           responses=documented(404), openapi_extra=KEY_SECURITY)
async def retrieve(body: RetrieveRequest, request: Request, query: QueryContextDep) -> Response:
    # The checks run here, on the event loop; the rest in the embedder's worker (RetrieveWork), so that the
    # request's one trip off the loop is the one to the model and back.
    loaded = await query.registry.get_async(body.index)
    work = RetrieveWork(body, loaded, query.limits, item_image_urls(request, loaded.name))
    return json_bytes(await loaded.answer_async(work))


def answer_retrieve(body: RetrieveRequest, request: Request, registry: IndexRegistry, limits: QueryLimits) -> bytes:
    """The route's work and its JSON answer, HTTP aside, from any thread (the benchmark's in-process side)."""
    loaded = registry.get(body.index)
    return loaded.answer(RetrieveWork(body, loaded, limits, item_image_urls(request, loaded.name)))


class RetrieveWork:
    """One request's work (a ``QueryWork``): inputs checked when made, before any model work; decoding
    (``prepare``), then search and the answer (``finish``) run in the embedder's worker."""

    def __init__(self, body: RetrieveRequest, loaded: LoadedIndex, limits: QueryLimits,
                 image_url: Callable[[int], str]):
        self.t0 = time.perf_counter()
        n = len(body.images) + len(body.texts)
        if n == 0:
            raise InvalidInputError("give at least one query in 'images' (base64) or 'texts'")
        if n > limits.max_queries:
            raise InvalidInputError(f"at most {limits.max_queries} queries per request, got {n}")
        if body.k > limits.max_k:
            raise InvalidInputError(f"k must be <= {limits.max_k}, got {body.k}")
        if body.texts and not loaded.embedder.supports_text:
            raise InvalidInputError(f"index {loaded.name!r} uses the image-only embedder {loaded.embedder.name!r}; "
                                    "it cannot answer text queries")
        self.body, self.loaded, self.limits, self.image_url = body, loaded, limits, image_url
        self.model = "images" if body.images else "texts"
        self.size = len(body.images) or len(body.texts)
        self.queries: list[dict[str, Any]] = []
        self.screen = self.text_vectors = None

    def prepare(self) -> Any:
        """Decode the images (the screen may load a classifier the first time); the model's inputs."""
        body, loaded = self.body, self.loaded
        self.screen = query_screen(loaded, self.limits, body.model_dump(include=set(SCREEN_FIELDS)))
        images = []
        for i, b64 in enumerate(body.images):
            image, raw = decode_base64_image(b64, what=f"images[{i}]", limits=self.limits)
            images.append(image)
            self.queries.append({"type": "image", "index": i, "sha256": sha256_bytes(raw)})
        self.queries += [{"type": "text", "index": i, "text": t} for i, t in enumerate(body.texts)]
        if not images:
            return list(body.texts)
        if body.texts:  # images and texts in one request: the texts go through their own batcher from here
            self.text_vectors = loaded.embed_texts(body.texts)
        return loaded.preprocess(images)

    def finish(self, rows: np.ndarray) -> bytes:
        """Search (screened as asked), attach provenance and image URLs: the answer as JSON."""
        body, loaded, screen = self.body, self.loaded, self.screen
        vectors = rows if self.text_vectors is None else np.concatenate([rows, self.text_vectors])
        overrides = {"nprobe": body.nprobe, "ef_search": body.ef_search, "rerank_k_factor": body.rerank_k_factor}
        if screen is None:
            hits = loaded.neighbours(vectors, body.k, **overrides)
            removed = [{} for _ in hits]
        else:
            hits, removed = loaded.screened_neighbours(vectors, body.k, screen, **overrides)
        results = [
            QueryResult(query=q, neighbours=[_neighbour(self.image_url, loaded, h, q) for h in row],
                        removed=dict(gone))
            for q, row, gone in zip(self.queries, hits, removed, strict=True)
        ]
        return RetrieveResponse(index=loaded.name, index_id=loaded.index_id, embedder=loaded.embedder.name,
                                k=body.k, duration_ms=round((time.perf_counter() - self.t0) * 1000, 3),
                                results=results, screening=screen.report() if screen is not None else None
                                ).model_dump_json()


def json_bytes(data: bytes) -> Response:
    """An answer already serialised (pydantic's ``model_dump_json``, in the worker): returning the model
    instead, FastAPI would validate it again against the response model and walk it with ``jsonable_encoder``
    (a third of a 10-neighbour answer's cost), on the event loop."""
    return Response(content=data, media_type="application/json")


#: (router, index, origin) -> the image URL around the item id; bounded, since the Host header is the client's
_IMAGE_URLS: dict[tuple, tuple[Any, str, str]] = {}


def item_image_urls(request: Request, index_name: str) -> Callable[[int], str]:
    """item id -> the URL of its image, as ``request.url_for`` builds it. ``url_for`` walks every route and parses
    the base URL again (0.1 ms a request on the event loop, more after a model call), so its answer is kept per
    index and per what the base URL comes from: scheme, server, root path and Host header."""
    scope = request.scope
    router = scope.get("router")  # routers are not hashable: keyed by id, checked by identity
    host = next((v for k, v in scope.get("headers", ()) if k == b"host"), None)
    server = scope.get("server")
    key = (id(router), index_name, scope.get("scheme"), tuple(server) if server else None,
           scope.get("app_root_path", scope.get("root_path")), host)
    cached = _IMAGE_URLS.get(key)
    if cached is None or cached[0] is not router:
        sample = str(request.url_for("get_index_item_image", name=index_name, item_id=0))
        if len(_IMAGE_URLS) >= 1024:
            _IMAGE_URLS.clear()
        cached = _IMAGE_URLS[key] = (router, *sample.rsplit("/0/", 1))
    _, head, tail = cached
    return lambda item_id: f"{head}/{int(item_id)}/{tail}"


def _neighbour(image_url: Callable[[int], str], loaded: LoadedIndex, hit: Hit, query: dict[str, Any]) -> Neighbour:
    prov = {"index": loaded.name} | retrieved_item_fields(
        loaded.corpus, hit.meta, sample_id=hit.id, similarity=hit.similarity, rank=hit.rank, query=query,
        embedder_name=loaded.embedder.name) | {"method": f"retrieval:{query['type']}",
                                               "source_uri": loaded.public_source_uri(hit.meta)}
    return Neighbour(rank=hit.rank, sample_id=hit.id, similarity=prov["similarity"], caption=prov["caption"],
                     url=prov["url"], source_uri=prov["source_uri"],
                     image_url=image_url(hit.id), provenance=prov)


@router.get("/v1/indexes/{name}/items/{item_id}/image", name="get_index_item_image",
            summary="A corpus item's image, bytes exactly as stored; the key may also come as ?api_key=",
            dependencies=[Depends(current_key_or_query)],
            responses={200: {"content": {"image/*": {}}}, 304: {"description": "unchanged (If-None-Match)"},
                       **documented(404)})
def get_item_image(name: str, item_id: Annotated[int, Path(ge=0, le=2**62)], registry: IndexRegistryDep,
                   request: Request) -> Response:
    loaded = registry.get(registry.resolve(name))
    if item_id >= loaded.ntotal:
        raise NotFoundError(f"index {name!r} has items 0..{loaded.ntotal - 1}; no item {item_id}")
    metas = loaded.corpus.metadata([item_id])
    meta = metas[0] if metas else {}
    etag = f'"{meta["sha256"]}"' if meta.get("sha256") else None
    headers = {
        "Cache-Control": "public, max-age=86400",  # an index directory is immutable once built
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",  # crawled bytes never run in our origin
    }
    if etag:
        headers["ETag"] = etag
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
    data = loaded.corpus.read_bytes(item_id)
    return Response(content=data, media_type=media_type(data, meta.get("member") or meta.get("source")),
                    headers=headers)

