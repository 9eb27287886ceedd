"""clip-retrieval compatibility: ``/knn-service``, ``/indices-list``, ``/metadata``.

clip-retrieval cannot be installed beside the pinned stack (it pins pyarrow<16, webdataset<0.3, open-clip<3),
so ``clip_request`` below is ``ClipClient.__search_knn_api__`` of clip-retrieval 2.45.0 (clip_client.py),
request for request: ``requests.post(url, data=json.dumps({...}))`` -- every key, a JSON string body and no
Content-Type header. One test sends it over real HTTP with ``requests`` to a uvicorn on loopback.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from retrogen.service.api.routes.knn import dedup_keep
from retrogen.service.api.routes.knn import router as knn_router
from retrogen.service.api.routes.retrieve import router as retrieve_router
from retrogen.service.core.config import IndexConfig
from retrogen.service.domain.indexes import IndexRegistry
from tests.conftest import SERVICE_FAMILIES, ThreadedUvicorn, colour_image, make_router_app, png_bytes


def clip_payload(text=None, image=None, image_url=None, embedding_input=None, *, indice_name="corpus",
                 num_images=40, modality="image", deduplicate=True, use_safety_model=False,
                 use_violence_detector=False, aesthetic_score=9, aesthetic_weight=0.5, use_mclip=False) -> str:
    """The exact body ClipClient sends (its defaults: dedup, aesthetic 9 / 0.5, and safety and violence on,
    which these tests turn on only where they test them: they change which items come back)."""
    return json.dumps({
        "text": text, "image": image, "image_url": image_url, "embedding_input": embedding_input,
        "deduplicate": deduplicate, "use_safety_model": use_safety_model,
        "use_violence_detector": use_violence_detector, "indice_name": indice_name, "use_mclip": use_mclip,
        "aesthetic_score": aesthetic_score, "aesthetic_weight": aesthetic_weight, "modality": modality,
        "num_images": num_images, "num_result_ids": num_images,
    })


@pytest.fixture(scope="module")
def registry(service_index_dir):
    return IndexRegistry({"corpus": IndexConfig(path=service_index_dir)})


@pytest.fixture(scope="module")
def app(registry):
    return make_router_app(knn_router, retrieve_router, index_registry=registry)


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


def post_raw(client, path, body: str | bytes, headers=None):
    # like requests with data=<str>: no Content-Type header at all
    return client.post(path, content=body if isinstance(body, bytes) else body.encode(),
                       headers={"content-type": ""} | (headers or {}))


def image_b64(fam: str) -> str:
    return base64.b64encode(png_bytes(colour_image(SERVICE_FAMILIES[fam], noise_seed=42))).decode()


def test_indices_list(client):
    assert client.get("/indices-list").json() == ["corpus"]


def test_text_query_shape_and_order(client, registry):
    r = post_raw(client, "/knn-service", clip_payload(text="a red square", num_images=5, deduplicate=False))
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out, list) and len(out) == 5
    for row in out:
        assert {"id", "similarity", "url", "caption"} <= set(row)
        assert isinstance(row["id"], int) and isinstance(row["similarity"], float)
        assert row["url"].startswith("http://example.com/")
        assert row["source_uri"] == f"00000.tar#{row['key']}.png"  # relative to the corpus source, no server path
    loaded = registry.get("corpus")
    scores, ids = loaded.corpus.search(loaded.embedder.embed_texts(["a red square"]), 5)
    assert [row["id"] for row in out] == [int(i) for i in ids[0]]
    np.testing.assert_allclose([row["similarity"] for row in out], scores[0], atol=1e-5)
    # the aesthetic re-weighting is accepted and named as ignored; no filter was asked for, none is unavailable
    assert r.headers["x-retrogen-ignored"] == "aesthetic_score"
    assert "x-retrogen-unavailable" not in r.headers


def test_safety_model_flag_uses_the_corpus_punsafe_scores(client, registry):
    """ClipClient's use_safety_model drops items whose punsafe is above 0.5 (items 3-5 of each family here)."""
    loaded = registry.get("corpus")
    r = post_raw(client, "/knn-service", clip_payload(text="a red square", num_images=18, deduplicate=False,
                                                      use_safety_model=True))
    assert r.status_code == 200, r.text
    assert "x-retrogen-unavailable" not in r.headers
    got = [row["id"] for row in r.json()]
    punsafe = {m["id"]: m["punsafe"] for m in loaded.corpus.metadata(range(loaded.ntotal))}
    assert len(got) == 9 and all(punsafe[i] <= 0.5 for i in got)
    _, ids = loaded.corpus.search(loaded.embedder.embed_texts(["a red square"]), 18)
    assert got == [int(i) for i in ids[0] if punsafe[int(i)] <= 0.5], "the unfiltered order, screened"


def test_violence_detector_flag_runs_the_zero_shot_detector(client, registry):
    """use_violence_detector: items the zero-shot detector puts nearer the violent prompt are dropped."""
    from retrogen.retrieval.safety import VIOLENCE_PROMPTS

    loaded = registry.get("corpus")
    r = post_raw(client, "/knn-service", clip_payload(text="a blue square", num_images=18, deduplicate=False,
                                                      use_violence_detector=True))
    assert r.status_code == 200, r.text
    prompts = loaded.embedder.embed_texts(list(VIOLENCE_PROMPTS))
    emb = loaded.corpus.embeddings(range(loaded.ntotal)).astype(np.float32)
    violent = {i for i in range(loaded.ntotal) if (emb[i] @ prompts.T).argmax() == 1}
    expected = [int(i) for i in loaded.corpus.search(loaded.embedder.embed_texts(["a blue square"]), 18)[1][0]
                if int(i) not in violent]
    assert [row["id"] for row in r.json()] == expected


@pytest.fixture(scope="module")
def bare_client(tmp_path_factory, mean_colour_embedder):
    """A service over an image-only index of a plain folder: no captions, no punsafe scores, no text."""
    from retrogen.index_builder.build import build_index
    from retrogen.index_builder.config import IndexBuildConfig

    root = tmp_path_factory.mktemp("bare")
    for fam in SERVICE_FAMILIES:
        for i in range(3):
            colour_image(SERVICE_FAMILIES[fam], noise_seed=i).save(root / f"{fam}-{i}.png")
    build_index([str(root)], root / "index", embedder=mean_colour_embedder,
                config=IndexBuildConfig(index_type="flat", num_workers=1))
    registry = IndexRegistry({"corpus": IndexConfig(path=root / "index")})
    return TestClient(make_router_app(knn_router, retrieve_router, index_registry=registry))


def test_a_flag_the_index_cannot_serve_is_named_in_a_header(bare_client):
    """An image-only index has neither punsafe scores nor text: both flags are reported unavailable."""
    r = post_raw(bare_client, "/knn-service", clip_payload(image=image_b64("red"), num_images=3, deduplicate=False,
                                                           use_safety_model=True, use_violence_detector=True))
    assert r.status_code == 200, r.text
    assert r.headers["x-retrogen-unavailable"] == "use_safety_model,use_violence_detector"
    assert len(r.json()) == 3, "the results are not filtered by a filter that is unavailable"


def test_image_and_embedding_queries_agree(client, registry):
    img = post_raw(client, "/knn-service", clip_payload(image=image_b64("blue"), num_images=6, deduplicate=False))
    assert img.status_code == 200, img.text
    assert img.json()[0]["caption"] == "a blue square"
    loaded = registry.get("corpus")
    vec = loaded.embedder.embed_images([colour_image(SERVICE_FAMILIES["blue"], noise_seed=42)])[0]
    emb = post_raw(client, "/knn-service", clip_payload(embedding_input=(vec * 3).tolist(), num_images=6,
                                                        deduplicate=False))
    assert [r["id"] for r in emb.json()] == [r["id"] for r in img.json()], "embedding_input is normalised"


def test_deduplicate_drops_near_copies_like_clip_retrieval(client, registry):
    loaded = registry.get("corpus")
    full = post_raw(client, "/knn-service", clip_payload(text="a green square", num_images=18, deduplicate=False))
    dedup = post_raw(client, "/knn-service", clip_payload(text="a green square", num_images=18, deduplicate=True))
    full_ids, kept_ids = [r["id"] for r in full.json()], [r["id"] for r in dedup.json()]
    assert len(full_ids) == 18 and 0 < len(kept_ids) < 18, "flat shades of one colour are near-copies"
    assert kept_ids == [i for i in full_ids if i in kept_ids], "rank order is kept"
    emb = loaded.corpus.embeddings(kept_ids).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sims = emb @ emb.T
    assert (sims[np.triu_indices(len(kept_ids), 1)] < 0.94).all(), "no two kept items are near-copies"


def test_dedup_keep_is_connected_components():
    # a ~ b (0.95) and b ~ c (0.95) but a !~ c: one component {a, b, c}, only a kept (as clip-retrieval)
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([0.95, np.sqrt(1 - 0.95**2), 0.0])
    t = np.arccos(0.95) * 2
    c = np.array([np.cos(t), np.sin(t), 0.0])
    d = np.array([0.0, 0.0, 1.0])
    assert a @ c < 0.94
    assert dedup_keep(np.stack([a, b, c, d])) == [True, False, False, True]


def test_metadata_shape(client):
    r = post_raw(client, "/metadata", json.dumps({"ids": [3, 0], "indice_name": "corpus"}))
    assert r.status_code == 200
    out = r.json()
    assert [x["id"] for x in out] == [3, 0]
    assert out[1]["metadata"]["caption"] == "a red square"
    assert out[1]["metadata"]["image_url"].endswith("/v1/indexes/corpus/items/0/image")
    assert "source" not in out[1]["metadata"] and "offset" not in out[1]["metadata"]
    assert out[1]["metadata"]["source_uri"] == "00000.tar#red-000.png"
    assert post_raw(client, "/metadata", json.dumps({"ids": [], "indice_name": "corpus"})).json() == []


@pytest.mark.parametrize("path, body, status, fragment", [
    ("/knn-service", clip_payload(image_url="http://169.254.169.254/latest/meta-data"), 403, "SSRF"),
    ("/knn-service", clip_payload(), 422, "must fill one of text, image"),
    ("/knn-service", clip_payload(text="x", modality="text"), 422, "caption embeddings"),
    ("/knn-service", clip_payload(text="x", indice_name="laion5B"), 404, "unknown index 'laion5B'"),
    ("/knn-service", clip_payload(text="x", use_mclip=True), 422, "use_mclip is not supported"),
    ("/knn-service", clip_payload(text="x", num_images=100_000), 422, "<= 1000"),
    ("/knn-service", clip_payload(embedding_input=[0.1, 0.2]), 422, "has 2 values; index 'corpus' has dimension 16"),
    ("/knn-service", clip_payload(embedding_input=[0.0] * 16), 422, "non-zero"),
    ("/knn-service", clip_payload(image="@@@@"), 422, "image: not valid base64"),
    ("/knn-service", "{not json", 422, "not JSON"),
    ("/knn-service", b"\xff\xfe{}", 422, "not JSON"),
    ("/knn-service", "[" * 100_000, 422, "not JSON"),
    ("/knn-service", "[1, 2]", 422, "invalid request"),
    ("/knn-service", json.dumps({"text": "x", "num_images": "many"}), 422, "num_images"),
    ("/metadata", json.dumps({"ids": [18], "indice_name": "corpus"}), 404, "unknown: [18]"),
])
def test_bad_requests_get_a_clear_4xx(client, path, body, status, fragment):
    r = post_raw(client, path, body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]


def test_clip_client_wire_format_over_real_http(app):
    """What ClipClient does, byte for byte: requests.post(url, data=json.dumps(...)) to a real server."""
    import requests

    with ThreadedUvicorn(app) as server:
        r = requests.post(server.url + "/knn-service", data=clip_payload(text="a blue square", num_images=3),
                          timeout=60)
        assert "content-type" not in {k.lower() for k in r.request.headers}, "the body goes without a type"
        assert r.status_code == 200, r.text
        results = r.json()
        assert 1 <= len(results) <= 3 and results[0]["caption"] == "a blue square"
        served = requests.get(results[0]["image_url"], timeout=60)
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"
        assert requests.get(server.url + "/indices-list", timeout=60).json() == ["corpus"]


def test_api_keys_guard_retrieval_and_clip_client_can_pass_one_in_the_url(registry):
    from retrogen.service.core.config import Settings

    app = make_router_app(knn_router, retrieve_router, index_registry=registry,
                          settings=Settings(api_keys=["k-0123456789"]))
    c = TestClient(app)
    body = clip_payload(text="a red square", num_images=2)
    assert post_raw(c, "/knn-service", body).status_code == 401
    assert c.get("/indices-list").status_code == 401
    assert c.post("/v1/retrieve", json={"texts": ["x"]}).status_code == 401
    assert c.post("/v1/retrieve", json={"texts": ["x"]}, headers={"X-API-Key": "wrong-key-000"}).status_code == 401
    assert c.post("/v1/retrieve", json={"texts": ["x"]}, headers={"X-API-Key": "k-0123456789"}).status_code == 200
    # the query routes read the key themselves (deps.given_key): as the header schemes do, and no further
    for headers, status in [({"Authorization": "Bearer k-0123456789"}, 200),
                            ({"authorization": "bearer k-0123456789"}, 200),
                            ({"Authorization": "Bearer wrong-key-000"}, 401),
                            ({"Authorization": "Basic k-0123456789"}, 401), ({"X-API-Key": ""}, 401),
                            ({"X-API-Key": "", "Authorization": "Bearer k-0123456789"}, 200)]:
        assert c.post("/v1/retrieve", json={"texts": ["x"]}, headers=headers).status_code == status, headers
        assert post_raw(c, "/knn-service", body, headers=headers).status_code == status, headers
    assert c.post("/v1/retrieve?api_key=k-0123456789", json={"texts": ["x"]}).status_code == 401  # headers only
    # the key is checked before the body is read: a bad body without a key learns nothing about the schema
    for content in (b"{not json", b'{"texts": ["x"], "k": 0}'):
        assert c.post("/v1/retrieve", content=content, headers={"content-type": "application/json"}).status_code == 401
        assert post_raw(c, "/knn-service", content).status_code == 401
    assert c.get("/v1/indexes/corpus/items/0/image",
                 headers={"Authorization": "Bearer k-0123456789"}).status_code == 200
    # the image_url of a ClipClient result is fetched bare too: the key may come in its URL
    assert c.get("/v1/indexes/corpus/items/0/image").status_code == 401
    assert c.get("/v1/indexes/corpus/items/0/image?api_key=nope-nope-nope").status_code == 401
    assert c.get("/v1/indexes/corpus/items/0/image?api_key=k-0123456789").status_code == 200
    assert c.get("/v1/indexes?api_key=k-0123456789").status_code == 401  # the rest still wants a header
    # ClipClient("http://host/knn-service?api_key=...") works unchanged
    r = post_raw(c, "/knn-service?api_key=k-0123456789", body)
    assert r.status_code == 200 and len(r.json()) == 2
    assert post_raw(c, "/knn-service?api_key=nope-nope-nope", body).status_code == 401


def test_full_app_lets_clip_client_pass_its_key_in_the_url(registry, tmp_path):
    """Through the real app factory (not just the router): the global key check must not block ?api_key=."""
    from retrogen.service.api.main import create_app
    from retrogen.service.core.config import Settings

    settings = Settings(api_keys=["k-0123456789"], data_dir=tmp_path)
    with TestClient(create_app(settings, index_registry=registry, start_worker=False)) as c:
        body = clip_payload(text="a red square", num_images=2)
        assert post_raw(c, "/knn-service", body).status_code == 401
        r = post_raw(c, "/knn-service?api_key=k-0123456789", body)
        assert r.status_code == 200 and len(r.json()) == 2


def test_v1_retrieve_screens_by_opt_out_and_punsafe_and_still_fills_k(client, registry):
    """Opted-out and unsafe items are skipped, the search goes deeper so k items come back, and the response
    counts what was removed above the k-th item."""
    loaded = registry.get("corpus")
    metas = {m["id"]: m for m in loaded.corpus.metadata(range(loaded.ntotal))}
    _, ids = loaded.corpus.search(loaded.embedder.embed_texts(["a green square"]), loaded.ntotal)
    order = [int(i) for i in ids[0]]
    first = metas[order[0]]
    body = {"texts": ["a green square"], "k": 4, "max_punsafe": 0.5,
            "opt_out": [first["url"].replace("http://example.com", "HTTP://Example.COM")]}
    r = client.post("/v1/retrieve", json=body)
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    got = [n["sample_id"] for n in result["neighbours"]]
    expected = [i for i in order if i != order[0] and metas[i]["punsafe"] <= 0.5][:4]
    assert got == expected and [n["rank"] for n in result["neighbours"]] == [0, 1, 2, 3]
    cut = order.index(expected[-1])
    above = order[: cut + 1]
    assert result["removed"] == {k: v for k, v in {
        "opt_out": 1, "unsafe": sum(1 for i in above if i != order[0] and metas[i]["punsafe"] > 0.5)}.items() if v}
    prov = result["neighbours"][0]["provenance"]
    assert prov["status"] == "success" and prov["nsfw"] == "UNLIKELY"
    assert prov["punsafe"] == round(metas[got[0]]["punsafe"], 6) and prov["punsafe"] in (0.0, 0.2, 0.4)
    assert r.json()["screening"]["max_punsafe"] == 0.5


def test_v1_retrieve_refuses_thresholds_the_corpus_cannot_check_and_unoffered_classifiers(bare_client, client):
    r = bare_client.post("/v1/retrieve", json={"images": [image_b64("red")], "k": 2, "max_pwatermark": 0.5})
    assert r.status_code == 422 and "pwatermark" in r.json()["detail"]
    r = client.post("/v1/retrieve", json={"texts": ["x"], "k": 2, "safety_classifier": "os:system"})
    assert r.status_code == 422 and "not offered" in r.json()["detail"]
