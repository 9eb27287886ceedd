"""End to end through the service with the real backends: retrieval on a tiny open_clip index, generation
(``prompt``) on the tiny Stable Diffusion."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from retrogen.fileio import sha256_bytes
from tests.conftest import SERVICE_FAMILIES, colour_image, png_bytes
from tests.service_fakes import make_settings, zip_bytes


def _dataset(client):
    files = {f"{fam}/{i}.png": png_bytes(colour_image(SERVICE_FAMILIES[fam], noise_seed=50 + i))
             for fam in ("red", "blue") for i in range(2)}
    r = client.post("/v1/datasets", files={"file": ("d.zip", zip_bytes(files), "application/zip")})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_retrieval_job_end_to_end(tmp_path, service_index_dir):
    from retrogen.service.api.main import create_app

    app = create_app(make_settings(tmp_path / "data", indexes={"tiny": {"path": str(service_index_dir)}}),
                     start_worker=False)
    client = TestClient(app)
    ds = _dataset(client)
    bad = client.post("/v1/jobs", json={"dataset": ds, "method": "retrieval", "per_class": 2,
                                        "params": {"mode": "sideways"}})
    assert bad.status_code == 422 and "mode" in bad.json()["detail"]
    bad = client.post("/v1/jobs", json={"dataset": ds, "method": "retrieval", "per_class": 2,
                                        "params": {"label_check_embedder": "open_clip:ViT-B-32:/etc/passwd"}})
    assert bad.status_code == 422 and "server operator" in bad.json()["detail"]
    r = client.post("/v1/jobs", json={"dataset": ds, "method": "retrieval", "per_class": 3,
                                      "params": {"mode": "image", "leakage_threshold": None, "dedup_threshold": None}})
    assert r.status_code == 202, r.text
    assert app.state.worker.run_once("retrieval") == r.json()["id"]
    job = client.get(f"/v1/jobs/{r.json()['id']}").json()
    assert job["state"] == "succeeded", job
    assert job["index"] == "tiny" and job["num_images"] == 6, job["summary"]
    # per class: each class's own count (it once held the running count over all classes)
    assert job["progress"]["per_class"] == {"blue": {"done": 3, "total": 3}, "red": {"done": 3, "total": 3}}
    assert (job["progress"]["done"], job["progress"]["total"]) == (6, 6)
    items = client.get(f"/v1/jobs/{job['id']}/results").json()["items"]
    for it in items:
        p = it["provenance"]
        assert p["method"] == "retrieval:image" and p["label"] == it["label"]
        # where the corpus item came from, relative to its corpus source: no server path
        assert p["source_uri"] == f"00000.tar#{p['sample_key']}.png"
        # colour families: the tiny embedder is random, so only check what is exact: bytes and provenance
        assert sha256_bytes(client.get(it["url"]).content) == p["sha256"]
        assert "similarity" in p and "sample_id" in p


def test_jobs_an_index_cannot_run_are_refused_at_submission(tmp_path, mean_colour_embedder):
    """Text queries and the label check need an image-text embedder: on an image-only index they were queued
    (202) and then failed. The index's manifest says so; nothing is loaded to find out."""
    from retrogen.index_builder.build import build_index
    from retrogen.index_builder.config import IndexBuildConfig
    from retrogen.service.api.main import create_app
    from tests.conftest import write_service_corpus_tar

    tar = write_service_corpus_tar(tmp_path / "00000.tar")
    build_index([str(tar)], tmp_path / "pixels", embedder=mean_colour_embedder,
                config=IndexBuildConfig(index_type="flat", num_workers=1))
    app = create_app(make_settings(tmp_path / "data", indexes={"pixels": {"path": str(tmp_path / "pixels")},
                                                               "gone": {"path": str(tmp_path / "gone")}}),
                     start_worker=False)
    client = TestClient(app)
    ds = _dataset(client)

    def submit(index="pixels", **params):
        return client.post("/v1/jobs", json={"dataset": ds, "method": "retrieval", "per_class": 2, "index": index,
                                             "params": params})

    for params, words in (({"mode": "text"}, "params.mode='text'"), ({"mode": "mixed"}, "params.mode='mixed'"),
                          ({"label_check": True}, "params.label_check")):
        r = submit(**params)
        assert r.status_code == 422, r.text
        assert words in r.json()["detail"] and "image-only embedder 'meancolour'" in r.json()["detail"]
    r = submit(index="gone")
    assert r.status_code == 404 and "index 'gone'" in r.json()["detail"] and str(tmp_path) not in r.text
    for params, field in (({"nprobe": -5}, "nprobe"), ({"batch_size": 10**9}, "batch_size"),
                          ({"max_candidates_per_class": 10**12}, "max_candidates_per_class"),
                          ({"templates": ["{0} and {1}"]}, "templates"), ({"selection": "nearest"}, "selection"),
                          ({"diversity_pool": 10**6}, "diversity_pool")):
        r = submit(**params)
        assert r.status_code == 422 and field in r.json()["detail"], r.text
    assert client.get("/v1/jobs").json()["count"] == 0
    assert not app.state.index_registry.is_loaded("pixels"), "checking a request loads no index or model"
    for selection in ("knn", "diverse"):
        r = submit(mode="image", selection=selection, opt_out=["example.org", "f" * 64])
        assert r.status_code == 202, r.text
        assert app.state.worker.run_once("retrieval") == r.json()["id"]
        assert client.get(f"/v1/jobs/{r.json()['id']}").json()["state"] == "succeeded"
        items = client.get(f"/v1/jobs/{r.json()['id']}/results").json()["items"]
        assert items and {it["provenance"]["selection"] for it in items} == {selection}


def test_names_only_caption_job_with_a_holdout(tmp_path, mean_colour_embedder):
    """A job with class names and no dataset: caption matching on the corpus's captions ("a red square"), with
    a held-out dataset whose images nothing returned may near-duplicate."""
    from retrogen.index_builder.build import build_index
    from retrogen.index_builder.config import IndexBuildConfig
    from retrogen.service.api.main import create_app
    from tests.conftest import write_service_corpus_tar

    tar = write_service_corpus_tar(tmp_path / "00000.tar")
    build_index([str(tar)], tmp_path / "pixels", embedder=mean_colour_embedder,
                config=IndexBuildConfig(index_type="flat", num_workers=1))
    app = create_app(make_settings(tmp_path / "data", indexes={"pixels": {"path": str(tmp_path / "pixels")}}),
                     start_worker=False)
    client = TestClient(app)
    holdout = _dataset(client)  # red and blue squares

    def submit(**body):
        return client.post("/v1/jobs", json={"method": "retrieval", "per_class": 2, **body})

    for body, words in (({"classes": ["red"], "dataset": holdout}, "exactly one of"), ({}, "exactly one of"),
                        ({"classes": ["red"], "params": {"mode": "image"}}, "class names only"),
                        ({"classes": ["red"], "params": {"mode": "text"}}, "image-only embedder"),
                        ({"classes": ["a/b"]}, "folder name"), ({"classes": ["red", "red"]}, "unique"),
                        ({"classes": ["red"], "params": {"classes": ["x"]}}, "top-level"),
                        ({"classes": ["red"], "params": {"mode": "caption", "max_punsafe": 0.5,
                                                         "safety_classifier": "evil:run"}}, "not offered")):
        r = submit(**body)
        assert r.status_code == 422 and words in r.text, (body, r.text)
    r = submit(classes=["red", "green"], holdout=holdout,
               params={"mode": "caption", "leakage_threshold": 0.9999, "dedup_threshold": None, "max_punsafe": 0.5})
    assert r.status_code == 202, r.text
    assert r.json()["dataset"] is None and r.json()["params"]["classes"] == ["green", "red"]
    assert app.state.worker.run_once("retrieval") == r.json()["id"]
    job = client.get(f"/v1/jobs/{r.json()['id']}").json()
    assert job["state"] == "succeeded", job
    assert job["summary"]["classes_from"] == "names" and job["summary"]["method"] == "retrieval:caption"
    items = client.get(f"/v1/jobs/{job['id']}/results").json()["items"]
    assert sorted(it["label"] for it in items) == ["green", "green", "red", "red"]
    for it in items:
        p = it["provenance"]
        assert p["caption"] == f"a {it['label']} square" and p["query"]["type"] == "caption"
        assert p["punsafe"] <= 0.5 and "unsafe" in p["filters_passed"]


@pytest.mark.timeout(300)
def test_generation_prompt_job_end_to_end(tmp_path, tiny_sd_dir):
    from retrogen.service.api.main import create_app

    app = create_app(make_settings(tmp_path / "data", models={"tiny-sd": str(tiny_sd_dir)}), start_worker=False)
    client = TestClient(app)
    ds = _dataset(client)
    for key, value in (("ip_adapter", "/etc/passwd"), ("device", "cuda:3")):  # operator settings, not per job
        r = client.post("/v1/jobs", json={"dataset": ds, "method": "prompt", "per_class": 1, "params": {key: value}})
        assert r.status_code == 422 and key in r.json()["detail"]
    r = client.post("/v1/jobs", json={"dataset": ds, "method": "prompt", "per_class": 1, "params": {
        "num_inference_steps": 2, "size": 64, "seed": 3}})
    assert r.status_code == 202, r.text
    assert app.state.worker.run_once("generation") == r.json()["id"]
    job = client.get(f"/v1/jobs/{r.json()['id']}").json()
    assert job["state"] == "succeeded", job
    assert job["model"] == "tiny-sd" and job["num_images"] == 2
    items = client.get(f"/v1/jobs/{job['id']}/results").json()["items"]
    assert sorted(it["label"] for it in items) == ["blue", "red"]
    for it in items:
        assert it["provenance"]["num_inference_steps"] == 2 and it["provenance"]["prompt"]
        assert sha256_bytes(client.get(it["url"]).content) == it["provenance"]["sha256"]
