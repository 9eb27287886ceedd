"""``POST /v1/retrieve``, ``GET /v1/indexes``, the stored-image route and the index registry.

A real index (tiny open_clip, 18 items in three colour families) and the real embedder; no fakes.
"""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from retrogen.fileio import media_type, sha256_bytes
from retrogen.service.api.routes.retrieve import router as retrieve_router
from retrogen.service.core.config import IndexConfig
from retrogen.service.domain.indexes import IndexRegistry
from tests.conftest import SERVICE_FAMILIES, colour_image, make_router_app, png_bytes


@pytest.fixture(scope="module")
def registry(service_index_dir, tmp_path_factory):
    missing = tmp_path_factory.mktemp("missing") / "no-index"
    return IndexRegistry({"corpus": IndexConfig(path=service_index_dir), "broken": IndexConfig(path=missing)})


@pytest.fixture(scope="module")
def client(registry):
    return TestClient(make_router_app(retrieve_router, index_registry=registry))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def family_query(fam: str) -> str:
    return b64(png_bytes(colour_image(SERVICE_FAMILIES[fam], noise_seed=99)))


def test_image_queries_find_their_family_with_provenance(client, registry):
    body = {"images": [family_query("red"), family_query("blue")], "k": 4}
    r = client.post("/v1/retrieve", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["index"] == "corpus" and out["k"] == 4
    assert out["embedder"] == registry.get("corpus").embedder.name
    assert [q["query"]["type"] for q in out["results"]] == ["image", "image"]
    for res, fam in zip(out["results"], ("red", "blue"), strict=True):
        assert res["query"]["sha256"] == sha256_bytes(base64.b64decode(body["images"][res["query"]["index"]]))
        neighbours = res["neighbours"]
        assert [n["rank"] for n in neighbours] == [0, 1, 2, 3]
        sims = [n["similarity"] for n in neighbours]
        assert sims == sorted(sims, reverse=True)
        assert len({n["sample_id"] for n in neighbours}) == 4
        # the tiny random CLIP still separates flat colours: the nearest item is of the query's family
        assert neighbours[0]["caption"] == f"a {fam} square"
        for n in neighbours:
            prov = n["provenance"]
            assert prov["index_id"] == out["index_id"] and prov["sample_id"] == n["sample_id"]
            assert prov["query"] == res["query"] and prov["method"] == "retrieval:image"
            assert n["url"] == f"http://example.com/{prov['sample_key']}.png"
            # relative to the corpus source (the shard the index was built from): never a server path
            assert n["source_uri"] == prov["source_uri"] == f"00000.tar#{prov['sample_key']}.png"
            assert n["image_url"].endswith(f"/v1/indexes/corpus/items/{n['sample_id']}/image")


def test_search_matches_the_index_directly(client, registry):
    """The HTTP answer is exactly the embedder + CorpusIndex answer (same ids, same scores)."""
    loaded = registry.get("corpus")
    q = colour_image(SERVICE_FAMILIES["green"], noise_seed=7)
    scores, ids = loaded.corpus.search(loaded.embedder.embed_images([q]), 5)
    r = client.post("/v1/retrieve", json={"images": [b64(png_bytes(q))], "k": 5, "index": "corpus"})
    got = r.json()["results"][0]["neighbours"]
    assert [n["sample_id"] for n in got] == [int(i) for i in ids[0]]
    np.testing.assert_allclose([n["similarity"] for n in got], scores[0], atol=1e-5)


def test_text_queries_and_data_urls(client):
    data_url = "data:image/png;base64," + family_query("green")
    r = client.post("/v1/retrieve", json={"images": [data_url], "texts": ["a red square"], "k": 2})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [q["query"]["type"] for q in res] == ["image", "text"]
    assert res[1]["query"]["text"] == "a red square"
    assert res[1]["neighbours"][0]["provenance"]["method"] == "retrieval:text"


def test_k_larger_than_the_corpus_returns_every_item_once(client):
    r = client.post("/v1/retrieve", json={"texts": ["anything"], "k": 500})
    neighbours = r.json()["results"][0]["neighbours"]
    assert len(neighbours) == 18 and len({n["sample_id"] for n in neighbours}) == 18


def test_served_image_is_the_stored_bytes(client, registry):
    r = client.post("/v1/retrieve", json={"texts": ["a blue square"], "k": 1})
    n = r.json()["results"][0]["neighbours"][0]
    img = client.get(n["image_url"])
    assert img.status_code == 200
    assert img.headers["content-type"] == "image/png"
    assert sha256_bytes(img.content) == n["provenance"]["corpus_sha256"]
    assert img.content == registry.get("corpus").corpus.read_bytes(n["sample_id"])
    assert img.headers["x-content-type-options"] == "nosniff"
    again = client.get(n["image_url"], headers={"If-None-Match": img.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


@pytest.mark.parametrize("body, status, fragment", [
    ({}, 422, "at least one query"),
    ({"images": ["not base64!!"]}, 422, "images[0]: not valid base64"),
    ({"images": [b64(b"plain text, not an image")]}, 422, "images[0]: not_an_image"),
    ({"texts": ["x"], "k": 0}, 422, "greater than or equal to 1"),
    ({"texts": ["x"], "k": 5000}, 422, "k must be <= 1000"),
    ({"texts": ["x"] * 33}, 422, "at most 32 queries"),
    ({"texts": [""]}, 422, "at least 1 character"),
    ({"texts": ["x"], "index": "nope"}, 404, "unknown index 'nope'; configured: corpus, broken"),
    ({"texts": ["x"], "index": "broken"}, 404, "index 'broken': index directory"),
    ({"texts": ["x"], "colour": "red"}, 422, "Extra inputs are not permitted"),
])
def test_bad_requests_get_a_clear_4xx(client, body, status, fragment):
    r = client.post("/v1/retrieve", json=body)
    assert r.status_code == status, r.text
    assert fragment in str(r.json()["detail"])


def test_decompression_bomb_is_refused_before_decoding(client):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8000, 6000)).save(buf, format="PNG")  # 48 MP > the 40 MP default; compresses to a few KB
    r = client.post("/v1/retrieve", json={"images": [b64(buf.getvalue())]})
    assert r.status_code == 422 and "too_many_pixels" in r.json()["detail"]


def test_image_route_errors(client):
    assert client.get("/v1/indexes/corpus/items/18/image").status_code == 404
    assert "no item 18" in client.get("/v1/indexes/corpus/items/18/image").json()["detail"]
    assert client.get("/v1/indexes/corpus/items/-1/image").status_code == 422
    assert client.get("/v1/indexes/nope/items/0/image").status_code == 404


def test_list_indexes_reports_loaded_state_without_loading(service_index_dir):
    registry = IndexRegistry({"a": IndexConfig(path=service_index_dir)})
    c = TestClient(make_router_app(retrieve_router, index_registry=registry))
    assert c.get("/v1/indexes").json() == {"data": [{"name": "a", "loaded": False, "embedder": None}], "count": 1}
    assert not registry.is_loaded("a")
    c.post("/v1/retrieve", json={"texts": ["x"], "k": 1})
    info = c.get("/v1/indexes").json()["data"][0]
    assert info["loaded"] and info["count"] == 18 and info["dim"] == 16 and info["faiss_kind"] == "flat"


def test_registry_loads_each_index_once_under_concurrency(service_index_dir):
    registry = IndexRegistry({"a": {"path": str(service_index_dir)}, "b": str(service_index_dir)})
    barrier = threading.Barrier(6)
    got = []

    def worker(name):
        barrier.wait()
        got.append(registry.get(name))

    threads = [threading.Thread(target=worker, args=("ab"[i % 2],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(x) for x in got}) == 2, "one LoadedIndex per name"
    assert registry.get("a").embedder is registry.get("b").embedder, "one embedder per model name"
    assert registry.get(None).name == "a"


def test_registry_embedder_override_must_keep_the_dimension(service_index_dir, tiny_open_clip_dir):
    from retrogen.errors import InvalidInputError

    ok = IndexRegistry({"a": IndexConfig(path=service_index_dir, embedder=f"open_clip:local-dir:{tiny_open_clip_dir}")})
    assert ok.get("a").embedder.dim == 16
    bad = IndexRegistry({"a": IndexConfig(path=service_index_dir, embedder="efficientnet-lite0")})
    with pytest.raises(InvalidInputError, match="has dim 1280, the index has dim 16"):
        bad.get("a")
    assert not bad.is_loaded("a"), "a failed load is not cached"


def test_empty_registry_says_how_to_configure():
    c = TestClient(make_router_app(retrieve_router, index_registry=IndexRegistry({})))
    r = c.post("/v1/retrieve", json={"texts": ["x"]})
    assert r.status_code == 404 and "no index is configured" in r.json()["detail"]


def test_media_type_sniffing_prefers_magic_and_never_says_svg():
    assert media_type(b"\xff\xd8\xff\xe0....", "x.png") == "image/jpeg"
    assert media_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ", None) == "image/webp"
    assert media_type(b"<svg onload=alert(1)>", "evil.svg") == "application/octet-stream"
    assert media_type(b"????", "photo.jpeg") == "image/jpeg"


def test_the_service_app_serves_retrieval_with_its_settings(service_index_dir, tmp_path):
    """The real app factory: index from Settings, limits from Settings, the same answers as the router alone."""
    from retrogen.service.api.main import create_app
    from retrogen.service.core.config import Settings

    settings = Settings(data_dir=tmp_path / "data", indexes={"corpus": IndexConfig(path=service_index_dir)},
                        max_queries=2, enable_worker=False)
    with TestClient(create_app(settings, start_worker=False)) as c:
        assert [d["name"] for d in c.get("/v1/indexes").json()["data"]] == ["corpus"]
        r = c.post("/v1/retrieve", json={"texts": ["a red square"], "k": 3})
        assert r.status_code == 200, r.text
        first = r.json()["results"][0]["neighbours"][0]
        assert c.get(first["image_url"]).content == IndexRegistry(
            {"c": IndexConfig(path=service_index_dir)}).get("c").corpus.read_bytes(first["sample_id"])
        too_many = c.post("/v1/retrieve", json={"texts": ["a", "b", "c"]})
        assert too_many.status_code == 422 and "at most 2 queries" in too_many.json()["detail"]
        knn = c.post("/knn-service", content=json.dumps({"text": "a red square", "num_images": 3,
                                                         "indice_name": "corpus", "modality": "image"}))
        assert knn.status_code == 200 and [x["id"] for x in knn.json()] == [
            n["sample_id"] for n in r.json()["results"][0]["neighbours"]]
        assert c.get("/gallery/some-job").status_code == 404  # keys off: an unknown job has no page


def test_preload_loads_every_index_at_start_and_readyz_waits_for_it(service_index_dir, tmp_path):
    """With preload_indexes the app loads its indexes while it starts; /readyz says which are still loading or
    failed (by name, never by server folder) and is ready only once all are in."""
    import time

    from retrogen.service.api.main import create_app
    from retrogen.service.core.config import Settings

    empty = tmp_path / "srv" / "empty-index"
    empty.mkdir(parents=True)
    indexes = {"corpus": IndexConfig(path=service_index_dir), "broken": IndexConfig(path=empty)}
    for preload in (True, False):
        settings = Settings(data_dir=tmp_path / f"data-{preload}", indexes=indexes, enable_worker=False,
                            preload_indexes=preload)
        app = create_app(settings, start_worker=False)
        with TestClient(app) as c:
            deadline = time.monotonic() + 60
            while (ready := c.get("/readyz").json())["checks"].get("indexes", "").startswith("loading") \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            loaded = {d["name"]: d["loaded"] for d in c.get("/v1/indexes").json()["data"]}
            if not preload:
                assert "indexes" not in ready["checks"] and loaded == {"corpus": False, "broken": False}
                continue
            assert loaded == {"corpus": True, "broken": False}, "no query was made: preloaded"
            r = c.get("/readyz")
            assert r.status_code == 503 and r.json()["checks"]["database"] == "ok"
            assert r.json()["checks"]["indexes"].startswith("error: broken: index 'broken'"), r.json()
            assert str(tmp_path) not in r.text


def test_preload_status_names_the_indexes_still_loading(service_index_dir, monkeypatch):
    registry = IndexRegistry({"a": IndexConfig(path=service_index_dir), "b": IndexConfig(path=service_index_dir)})
    go = threading.Event()
    load = IndexRegistry._load

    def slow_load(self, name):
        go.wait(30)
        return load(self, name)

    monkeypatch.setattr(IndexRegistry, "_load", slow_load)
    thread = registry.start_preload()
    assert registry.preload_status() == "loading: a, b"
    go.set()
    thread.join(60)
    assert registry.preload_status() == "ok" and registry.is_loaded("a") and registry.is_loaded("b")


def test_preload_retries_an_index_whose_store_was_down(service_index_dir, monkeypatch):
    """A replica that started while its index could not be read becomes ready once it can, with no query."""
    from retrogen.retrieval.errors import IndexStoreError

    registry = IndexRegistry({"a": IndexConfig(path=service_index_dir)})
    load, failures = IndexRegistry._load, [2]

    def flaky_load(self, name):
        if failures[0]:
            failures[0] -= 1
            raise IndexStoreError("cannot list s3://bucket/idx: connection refused")
        return load(self, name)

    monkeypatch.setattr(IndexRegistry, "_load", flaky_load)
    thread = registry.start_preload(retry_s=0.05)
    thread.join(60)
    assert not thread.is_alive() and failures == [0] and registry.preload_status() == "ok"
    registry.preload()  # without retry_s: one pass
    assert registry.preload_status() == "ok"


def test_model_calls_are_bounded_and_concurrent_requests_share_them():
    """At most ``workers`` model calls at once; requests that arrive while the model is busy go in one call."""
    import time

    from retrogen.service.domain.batching import MicroBatcher

    inside, peak, sizes, lock = [0], [0], [], threading.Lock()

    def model(batch):
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
            sizes.append(len(batch))
        time.sleep(0.05)  # long enough for the other threads to pile up
        with lock:
            inside[0] -= 1
        return np.asarray(batch, np.float32)[:, None] * 2

    batcher = MicroBatcher(model, join=np.concatenate, workers=2)
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, batcher(np.array([i, i + 100]))))
               for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2 and sum(sizes) == 24 and len(sizes) < 12, sizes
    for i in range(12):  # each request gets its own rows back
        np.testing.assert_array_equal(results[i][:, 0], [2 * i, 2 * (i + 100)])


def test_a_failing_input_fails_only_its_own_request():
    from retrogen.service.domain.batching import MicroBatcher

    def model(batch):
        if any(x < 0 for x in batch):
            raise ValueError("negative input")
        return np.asarray(batch, np.float32)[:, None]

    batcher = MicroBatcher(model, join=lambda parts: [x for p in parts for x in p], workers=1)
    out, errors = {}, {}

    def call(i, items):
        try:
            out[i] = batcher(items)
        except ValueError as e:
            errors[i] = str(e)

    threads = [threading.Thread(target=call, args=(i, [-1] if i == 3 else [i])) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == {3: "negative input"} and sorted(out) == [0, 1, 2, 4, 5, 6, 7]
    assert all(out[i][0, 0] == i for i in out)


class _Work:
    """A BatchWork that records where its steps ran: inputs [i, i + 100], answer = rows + 1."""

    def __init__(self, i, fail_prepare=False):
        self.i, self.size, self.fail, self.threads = i, 2, fail_prepare, []

    def prepare(self):
        self.threads.append(threading.current_thread().name)
        if self.fail:
            raise ValueError(f"bad input {self.i}")
        return np.array([self.i, self.i + 100])

    def finish(self, rows):
        self.threads.append(threading.current_thread().name)
        return rows[:, 0] + 1


def test_awaited_work_runs_in_the_worker_and_shares_model_calls():
    """``do_async``: prepare and finish run in the batcher's worker, not on the event loop's thread; concurrent
    requests share model calls; a failing prepare fails its own request only, before the model sees it."""
    import asyncio
    import time

    from retrogen.service.domain.batching import MicroBatcher

    seen = []

    def model(batch):
        seen.extend(batch.tolist())
        time.sleep(0.05)  # the other requests pile up meanwhile
        return np.asarray(batch, np.float32)[:, None] * 2

    batcher = MicroBatcher(model, join=np.concatenate, workers=1, name="q")
    works = [_Work(i, fail_prepare=(i == 3)) for i in range(8)]

    async def main():
        return await asyncio.gather(*(batcher.do_async(w) for w in works), return_exceptions=True)

    out = asyncio.run(main())
    assert isinstance(out[3], ValueError) and str(out[3]) == "bad input 3" and 3 not in seen
    for i in set(range(8)) - {3}:
        np.testing.assert_array_equal(out[i], [2 * i + 1, 2 * (i + 100) + 1])
    assert batcher.calls < 7 and sorted(seen) == sorted(x for i in range(8) if i != 3 for x in (i, i + 100))
    assert {t for w in works for t in w.threads} == {"q-0"}
    assert threading.main_thread().name not in {t for w in works for t in w.threads}


def test_a_cancelled_caller_leaves_the_worker_serving():
    """A request whose caller went away (a client disconnect cancels its task) still runs; the worker lives on."""
    import asyncio

    from retrogen.service.domain.batching import MicroBatcher

    gate = threading.Event()
    batcher = MicroBatcher(lambda b: (gate.wait(10), np.asarray(b, np.float32)[:, None])[1], join=np.concatenate,
                           workers=1)

    async def cancelled():
        task = asyncio.ensure_future(batcher.do_async(_Work(1)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())  # the loop is closed when the worker finishes that request
    gate.set()
    np.testing.assert_array_equal(batcher.do(_Work(5)), [6, 106])


def test_a_query_leaves_the_event_loop_free(registry, monkeypatch):
    """While one request's model call runs, the same event loop still answers another request: decoding,
    the model, search and the answer run in the embedder's worker."""
    loaded = registry.get("corpus")
    entered, release, waited = threading.Event(), threading.Event(), []
    real = loaded.batchers.images.run

    def held(batch):
        entered.set()
        waited.append(release.wait(20))  # False: nobody released it, the loop was blocked
        return real(batch)

    monkeypatch.setattr(loaded.batchers.images, "run", held)
    out = []
    with TestClient(make_router_app(retrieve_router, index_registry=registry)) as c:
        t = threading.Thread(target=lambda: out.append(c.post("/v1/retrieve", json={"images": [family_query("red")],
                                                                                  "k": 3})))
        t.start()
        assert entered.wait(20)
        assert c.get("/v1/indexes").status_code == 200  # answered while the model call is held
        release.set()
        t.join(30)
    assert waited == [True] and out[0].status_code == 200 and len(out[0].json()["results"][0]["neighbours"]) == 3


def test_image_urls_follow_each_requests_origin(registry):
    """The image URL template is cached per origin: another Host or root path gets its own URLs, as url_for's."""
    body = {"images": [family_query("red")], "k": 2}
    plain = TestClient(make_router_app(retrieve_router, index_registry=registry))
    prefixed = TestClient(make_router_app(retrieve_router, index_registry=registry), root_path="/api")
    seen = {}
    for c, root, host in [(plain, "", "a.example"), (plain, "", "b.example:8080"), (plain, "", "a.example"),
                          (prefixed, "/api", "a.example")]:
        hits = c.post("/v1/retrieve", json=body, headers={"host": host}).json()["results"][0]["neighbours"]
        urls = [h["image_url"] for h in hits]
        assert urls == [f"http://{host}{root}/v1/indexes/corpus/items/{h['sample_id']}/image" for h in hits]
        assert seen.setdefault((root, host), urls) == urls
        assert c.get(urls[0].removeprefix(f"http://{host}{root}"), headers={"host": host}).status_code == 200


def test_the_benchmarks_in_process_answer_is_the_routes(client, registry):
    """``answer_retrieve`` (what bench_service.py times in-process) returns the route's own JSON."""
    from retrogen.service.api.routes.retrieve import RetrieveRequest, answer_retrieve
    from retrogen.service.domain.queries import QueryLimits

    body = {"images": [family_query("red")], "texts": ["a blue square"], "k": 4, "max_punsafe": 0.5}

    class FakeRequest:
        scope = {"type": "http", "scheme": "http", "headers": [(b"host", b"in-process")]}

        def url_for(self, route, /, **params):
            return f"http://testserver/v1/indexes/{params['name']}/items/{params['item_id']}/image"

    direct = json.loads(answer_retrieve(RetrieveRequest(**body), FakeRequest(), registry, QueryLimits()))
    served = client.post("/v1/retrieve", json=body).json()
    assert direct.pop("duration_ms") >= 0 and served.pop("duration_ms") >= 0
    assert direct == served and [q["query"]["type"] for q in direct["results"]] == ["image", "text"]


def test_batched_embeddings_equal_unbatched_ones(service_index_dir):
    """Images and texts embedded through the batcher, from many threads, match one-at-a-time embeddings."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import SERVICE_FAMILIES, colour_image

    loaded = IndexRegistry({"a": IndexConfig(path=service_index_dir)}, max_concurrent_embeds=1).get("a")
    images = [colour_image(rgb, noise_seed=i) for i, rgb in enumerate(SERVICE_FAMILIES.values())] * 4
    texts = [f"a {fam} square" for fam in SERVICE_FAMILIES] * 4
    with ThreadPoolExecutor(12) as pool:
        got_i = list(pool.map(lambda im: loaded.embed_images([im]), images))
        got_t = list(pool.map(lambda t: loaded.embed_texts([t]), texts))
    for im, g in zip(images, got_i, strict=True):
        np.testing.assert_allclose(g, loaded.embedder.embed_images([im]), atol=1e-5)
    for t, g in zip(texts, got_t, strict=True):
        np.testing.assert_allclose(g, loaded.embedder.embed_texts([t]), atol=1e-5)
    assert loaded.batchers.images.calls <= len(images) and loaded.batchers.texts.calls <= len(texts)


def test_public_source_uri_never_shows_a_server_path():
    from retrogen.service.domain.indexes import public_source_uri

    roots, index = ["/srv/corpora/laion", "/srv/shards/00001.tar", "s3://bucket/x"], "/srv/indexes/laion"
    cases = {
        ("/srv/corpora/laion/a/b.jpg", None): "laion/a/b.jpg",
        ("/srv/shards/00001.tar", "k.jpg"): "00001.tar#k.jpg",
        ("/srv/indexes/laion/imported/c.jpg", None): "imported/c.jpg",
        ("/somewhere/else/d.png", None): "d.png",
        ("file:///srv/corpora/laion/e.jpg", None): "laion/e.jpg",
        ("s3://bucket/x/f.jpg", None): "s3://bucket/x/f.jpg",
        ("https://example.com/g.jpg", None): "https://example.com/g.jpg",
        ("relative/h.jpg", None): "relative/h.jpg",
        ("../../etc/i.jpg", None): "i.jpg",
    }
    for (source, member), expected in cases.items():
        assert public_source_uri({"source": source, "member": member}, roots, index) == expected, source
    assert public_source_uri({"source": None}, roots, index) is None
