"""TestClient tests of the datasets, jobs, models and health endpoints, with fake runners (no models)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from fastapi.testclient import TestClient

from retrogen.fileio import sha256_bytes
from tests.service_fakes import dataset_files, fake_registry, make_settings, zip_bytes


@pytest.fixture()
def app(tmp_path):
    from retrogen.service.api.main import create_app

    return create_app(make_settings(tmp_path / "data", indexes={"tiny": {"path": str(tmp_path / "idx")}}),
                      methods=fake_registry(), start_worker=False)


@pytest.fixture()
def client(app):
    return TestClient(app)


def upload(client, files=None, name="pets", headers=None):
    data = zip_bytes(files or dataset_files())
    return client.post("/v1/datasets", files={"file": ("d.zip", data, "application/zip")}, data={"name": name},
                       headers=headers or {})


def run_job(app, client, dataset_id, method="fake-retrieval", per_class=3, **extra):
    r = client.post("/v1/jobs", json={"dataset": dataset_id, "method": method, "per_class": per_class, **extra})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued" and r.headers["location"] == f"/v1/jobs/{job['id']}"
    kind = "generation" if "generation" in method else "retrieval"
    assert app.state.worker.run_once(kind) == job["id"]
    return client.get(f"/v1/jobs/{job['id']}").json()


def test_dataset_upload_list_get_delete(client):
    r = upload(client)
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["classes"] == {"cat": 2, "dog": 2} and ds["num_images"] == 4 and ds["name"] == "pets"
    assert client.get(f"/v1/datasets/{ds['id']}").json() == ds
    listed = client.get("/v1/datasets").json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == ds["id"]
    # identical content again -> the same dataset (content-addressed, not a second copy)
    assert upload(client).json()["id"] == ds["id"]
    assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert client.get(f"/v1/datasets/{ds['id']}").status_code == 404
    assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 404


def test_job_lifecycle_results_images_export(app, client):
    ds = upload(client).json()
    job = run_job(app, client, ds["id"], per_class=3)
    assert job["state"] == "succeeded", job
    assert job["num_images"] == 6 and job["progress"]["stage"] == "done" and job["progress"]["per_class"]["dog"] == \
        {"done": 3, "total": 3}
    res = client.get(f"/v1/jobs/{job['id']}/results").json()
    assert res["count"] == 6 and res["summary"]["method"] == "fake-retrieval"
    assert {it["label"] for it in res["items"]} == {"cat", "dog"}
    item = res["items"][0]
    img = client.get(item["url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert sha256_bytes(img.content) == item["provenance"]["sha256"]
    assert client.get(item["url"]).content == img.content  # stable URL
    lines = client.get(f"/v1/jobs/{job['id']}/results", params={"format": "jsonl"}).text.splitlines()
    assert [json.loads(line)["url"] for line in lines] == [it["url"] for it in res["items"]]
    # ImageFolder tar: every image with its provenance sha, plus provenance.jsonl and summary.json
    tar = tarfile.open(fileobj=io.BytesIO(client.get(f"/v1/jobs/{job['id']}/export").content))
    names = tar.getnames()
    assert "provenance.jsonl" in names and "summary.json" in names
    for it in res["items"]:
        assert sha256_bytes(tar.extractfile(it["file"]).read()) == it["provenance"]["sha256"]
    # webdataset, two shards of 4
    r = client.get(f"/v1/jobs/{job['id']}/export", params={"format": "webdataset", "shard": 1, "shard_size": 4})
    assert r.headers["x-retrogen-shards"] == "2"
    wds = tarfile.open(fileobj=io.BytesIO(r.content)).getnames()
    assert wds == ["00000004.png", "00000004.json", "00000004.cls", "00000005.png", "00000005.json", "00000005.cls"]
    assert client.get(f"/v1/jobs/{job['id']}/export", params={"format": "webdataset", "shard": 2,
                                                               "shard_size": 4}).status_code == 422
    events = client.get(f"/v1/jobs/{job['id']}/events").json()
    assert [e["message"] for e in events if e["kind"] == "state"][0] == "queued"
    assert any(e["kind"] == "progress" for e in events)
    # the dataset is in use by nothing active now, so it may be deleted; results stay
    assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert client.get(item["url"]).content == img.content


def test_job_errors(app, client):
    ds = upload(client).json()
    post = lambda **kw: client.post("/v1/jobs", json={"dataset": ds["id"], "method": "fake-retrieval",  # noqa: E731
                                                      "per_class": 2} | kw)
    r = post(method="nope")
    assert r.status_code == 422 and "fake-retrieval" in r.json()["detail"]
    assert post(dataset="ds_missing").status_code == 404
    r = post(per_class=100_000)
    assert r.status_code == 422 and "maximum" in r.json()["detail"]
    assert post(per_class=0).status_code == 422
    r = post(params={"colour": 1})
    assert r.status_code == 422 and "colour" in r.json()["detail"]
    assert post(extra_field=1).status_code == 422
    r = post(method="retrieval", index="elsewhere")  # needs the real registry: not in the fake one
    assert r.status_code == 422
    assert client.get("/v1/jobs/job_nope").status_code == 404
    assert client.get("/v1/jobs/bad id!").status_code == 422
    # a queued job has no results yet: 409, and can be cancelled at once
    job = post().json()
    assert client.get(f"/v1/jobs/{job['id']}/results").status_code == 409
    assert client.get(f"/v1/jobs/{job['id']}/images/cat/00000.png").status_code == 409
    # deleting its dataset is refused while the job is queued
    assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 409
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    assert app.state.worker.run_once("retrieval") is None  # nothing left to run
    # runner failures become failed jobs with the reason; the worker survives
    for method, reason in (("boom", "internal error: the job crashed (RuntimeError); the server log has the details"),
                           ("bad", "the fake runner refuses this dataset")):
        j = run_job(app, client, ds["id"], method=method)
        assert j["state"] == "failed" and j["error"] == reason
        assert client.post(f"/v1/jobs/{j['id']}/cancel").status_code == 409
    listed = client.get("/v1/jobs", params={"state": "failed"}).json()
    assert listed["count"] == 2
    assert client.get("/v1/jobs", params={"state": "weird"}).status_code == 422


def test_image_paths_are_confined(app, client):
    ds = upload(client).json()
    job = run_job(app, client, ds["id"], per_class=1)
    for bad in ("provenance.jsonl", "summary.json", "cat/../summary.json", "cat/nope.png", "../../etc/passwd"):
        assert client.get(f"/v1/jobs/{job['id']}/images/{bad}").status_code == 404, bad


def test_models_health_metrics(app, client):
    m = client.get("/v1/models").json()
    assert m["methods"]["fake-generation"] == "generation" and m["indexes"] == ["tiny"]
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "store": "ok"}
    ds = upload(client).json()
    run_job(app, client, ds["id"], method="fake-generation", per_class=2)
    client.post("/v1/jobs", json={"dataset": ds["id"], "method": "fake-retrieval", "per_class": 1})
    text = client.get("/metrics").text
    assert 'retrogen_images_produced_total{method="fake-generation"} 4.0' in text
    assert 'retrogen_queue_depth{kind="retrieval",state="queued"} 1.0' in text
    assert 'retrogen_job_duration_seconds_count{kind="generation",method="fake-generation",state="succeeded"} 1.0' \
        in text
    assert 'retrogen_request_duration_seconds_count{method="POST",route="/v1/datasets",status="201"}' in text


def test_openapi_docs(client):
    assert client.get("/docs").status_code == 200
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    assert {"/v1/datasets", "/v1/jobs", "/v1/jobs/{job_id}/results", "/v1/retrieve"} <= set(paths)
    # The query routes read the key in their one dependency and declare its schemes themselves: the same
    # security as every other keyed route, naming schemes the document defines, and 401 documented.
    schemes = set(doc["components"]["securitySchemes"])
    keyed = paths["/v1/jobs"]["get"]["security"]
    assert schemes == {"APIKeyHeader", "HTTPBearer"} and keyed == [{"APIKeyHeader": []}, {"HTTPBearer": []}]
    for path, method in [("/v1/retrieve", "post"), ("/knn-service", "post"), ("/indices-list", "get"),
                         ("/metadata", "post")]:
        op = paths[path][method]
        assert op["security"] == keyed and "401" in op["responses"], path


def test_api_keys_isolate_owners(tmp_path):
    from retrogen.service.api.main import create_app

    app = create_app(make_settings(tmp_path / "data", api_keys=["key-alice-123", "key-bob-4567"]),
                     methods=fake_registry(), start_worker=False)
    c = TestClient(app)
    alice, bob = {"X-API-Key": "key-alice-123"}, {"Authorization": "Bearer key-bob-4567"}
    assert upload(c).status_code == 401
    assert upload(c, headers={"X-API-Key": "wrong-key-000"}).status_code == 401
    ds = upload(c, headers=alice).json()
    r = c.post("/v1/jobs", json={"dataset": ds["id"], "method": "fake-retrieval", "per_class": 1}, headers=alice)
    job = r.json()
    assert app.state.worker.run_once("retrieval") == job["id"]
    # bob sees nothing of alice's, and cannot use her dataset, job, results or images
    assert c.get("/v1/datasets", headers=bob).json() == {"data": [], "count": 0}
    assert c.get("/v1/jobs", headers=bob).json() == {"data": [], "count": 0}
    for path in (f"/v1/datasets/{ds['id']}", f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/results",
                 f"/v1/jobs/{job['id']}/images/cat/00000.png", f"/v1/jobs/{job['id']}/export"):
        assert c.get(path, headers=bob).status_code == 404, path
        assert c.get(path, headers=alice).status_code == 200, path
    assert c.post(f"/v1/jobs/{job['id']}/cancel", headers=bob).status_code == 404
    assert c.delete(f"/v1/datasets/{ds['id']}", headers=bob).status_code == 404
    assert c.post("/v1/jobs", json={"dataset": ds["id"], "method": "fake-retrieval", "per_class": 1},
                  headers=bob).status_code == 404
    # the same content uploaded by bob is his own dataset row
    ds_bob = upload(c, headers=bob).json()
    assert ds_bob["id"] != ds["id"]
    assert c.get(f"/v1/datasets/{ds['id']}", headers=alice).status_code == 200
    assert c.get("/healthz").status_code == 200  # health needs no key


def test_settings_from_env_and_file(tmp_path, monkeypatch):
    from pydantic import ValidationError

    from retrogen.service.core.config import Settings

    f = tmp_path / "settings.json"
    f.write_text(json.dumps({"data_dir": str(tmp_path / "fromfile"), "max_per_class": 7,
                             "models": {"tiny": "/models/tiny"}}))
    monkeypatch.setenv("RETROGEN_SETTINGS_FILE", str(f))
    monkeypatch.setenv("RETROGEN_MAX_PER_CLASS", "9")
    monkeypatch.setenv("RETROGEN_INDEXES", json.dumps({"laion": {"path": "/idx/laion"}}))
    s = Settings()
    assert s.max_per_class == 9 and s.models == {"tiny": "/models/tiny"} and str(s.indexes["laion"].path) == "/idx/laion"
    assert s.resolved_database_url.endswith("fromfile/retrogen.db")
    with pytest.raises(ValidationError):
        Settings(api_keys=["changethis"])
    monkeypatch.setenv("RETROGEN_MAX_PER_CLASS", "-1")
    with pytest.raises(ValidationError):
        Settings()


# -- request bodies: the limit holds while a body streams in -------------------------------------------------

def _asgi_post(app, path: str, chunks, content_type: str = "application/json"):
    """POST ``chunks`` to the app as a chunked body (no Content-Length), straight through ASGI; returns
    (status, answer body, bytes the app pulled from the client)."""
    import asyncio

    sent, pulled, it = [], [0], iter(chunks)

    async def receive():
        chunk = next(it, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled[0] += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), (b"content-type", content_type.encode()),
                         (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 1234), "server": ("testserver", 80)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body or b"null"), pulled[0]


def _huge_json(total_mb: int):
    """A JSON object with one string member of ``total_mb`` MB, made 1 MB at a time (never held whole)."""
    yield b'{"name": "x", "images": [{"label": "cat", "data": "'
    for _ in range(total_mb):
        yield b"A" * (1 << 20)
    yield b'"}]}'


@pytest.mark.parametrize("path", ["/v1/datasets/manifest", "/v1/jobs", "/v1/retrieve", "/knn-service"])
def test_chunked_json_bodies_stop_at_the_limit(tmp_path, path):
    """A chunked body (no Content-Length) once went around the limit: 60-100 MB were read and parsed."""
    from retrogen.service.api.main import create_app

    app = create_app(make_settings(tmp_path / "data", max_json_bytes=2 << 20), methods=fake_registry(),
                     start_worker=False)
    status, body, pulled = _asgi_post(app, path, _huge_json(100))
    assert status == 413 and "2097152-byte limit" in body["detail"]
    assert pulled <= (2 << 20) + (1 << 20)  # the app stopped reading at the limit (one chunk past it at most)


def test_chunked_uploads_get_the_upload_limit_and_declared_sizes_are_refused_unread(tmp_path):
    from retrogen.service.api.main import create_app

    app = create_app(make_settings(tmp_path / "data", max_json_bytes=1000, max_upload_bytes=3 << 20),
                     methods=fake_registry(), start_worker=False)
    boundary = "b0undary"

    def multipart(size_mb: int):
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.zip\"\r\n"
               "Content-Type: application/zip\r\n\r\n").encode()
        for _ in range(size_mb):
            yield b"\0" * (1 << 20)
        yield f"\r\n--{boundary}--\r\n".encode()

    form = f"multipart/form-data; boundary={boundary}"
    status, body, pulled = _asgi_post(app, "/v1/datasets", multipart(50), form)
    assert status == 413 and pulled <= (4 << 20) + (64 << 10)
    # under the upload limit (far over the JSON one) the upload is read and judged on its content
    status, body, _ = _asgi_post(app, "/v1/datasets", multipart(1), form)
    assert status == 422 and "no images" in body["detail"]  # 1 MB of zeros reads as an empty tar
    client = TestClient(app)
    r = client.post("/v1/jobs", content=b"{" + b" " * 2000 + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["detail"].startswith("request body exceeds the 1000-byte limit")


def test_job_params_are_capped(app, client):
    """A 24 MB templates list was once stored on the job row and returned by every GET /v1/jobs."""
    ds = upload(client).json()
    r = client.post("/v1/jobs", json={"dataset": ds["id"], "method": "fake-retrieval", "per_class": 1,
                                      "params": {"mode": "x" * 70_000}})
    assert r.status_code == 422 and "65536" in r.json()["detail"], r.text
    assert client.get("/v1/jobs").json()["count"] == 0


# -- 4xx, never 500 -----------------------------------------------------------------------------------------

def test_out_of_range_numbers_are_a_4xx(app):
    client = TestClient(app, raise_server_exceptions=False)
    ds = upload(client).json()
    job = client.post("/v1/jobs", json={"dataset": ds["id"], "method": "fake-retrieval", "per_class": 1}).json()
    for path, params in (("/v1/jobs", {"offset": 2**63}), ("/v1/datasets", {"offset": 2**63}),
                         (f"/v1/jobs/{job['id']}/events", {"after": 2**63}), ("/v1/jobs", {"offset": -1})):
        r = client.get(path, params=params)
        assert r.status_code == 422, (path, r.status_code, r.text)
    for body in (b'{"dataset": "%s", "method": "fake-retrieval", "per_class": NaN}' % ds["id"].encode(),
                 b'{"dataset": "%s", "method": "fake-retrieval", "per_class": 1, "params": {"delay_s": Infinity}}'
                 % ds["id"].encode(),
                 b'{"dataset": "%s", "method": "fake-retrieval", "per_class": 1e400}' % ds["id"].encode()):
        r = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, (body, r.status_code, r.text)


# -- readiness, gallery, export, image URLs -----------------------------------------------------------------

def test_readyz_checks_the_store_root_exists_and_takes_a_write(app, client, tmp_path):
    import shutil

    assert client.get("/readyz").status_code == 200
    root = tmp_path / "data" / "store"
    assert not [p for p in root.iterdir() if p.name.startswith(".ready")], "the probe is removed"
    shutil.rmtree(root)
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["store"].startswith("error: the store's root folder is missing")
    assert str(tmp_path) not in r.text
    assert not root.exists(), "readiness must not recreate what it checks"
    root.write_text("a file, not a folder")
    assert client.get("/readyz").status_code == 503


def test_gallery_answers_404_for_unknown_jobs_and_reveals_nothing_with_keys_on(app, client, tmp_path):
    from retrogen.service.api.main import create_app

    job = run_job(app, client, upload(client).json()["id"], per_class=1)
    assert client.get(f"/gallery/{job['id']}").status_code == 200
    r = client.get("/gallery/job_nope")
    assert r.status_code == 404 and "no job 'job_nope'" in r.json()["detail"]
    keyed_app = create_app(make_settings(tmp_path / "keyed", api_keys=["gallery-key-1234"]), methods=fake_registry(),
                           start_worker=False)
    keyed = TestClient(keyed_app, headers={"X-API-Key": "gallery-key-1234"})
    real = run_job(keyed_app, keyed, upload(keyed).json()["id"], per_class=1)
    bare = TestClient(keyed_app)  # a page load carries no key
    known, unknown = bare.get(f"/gallery/{real['id']}"), bare.get("/gallery/job_nope")
    assert known.status_code == unknown.status_code == 200 and known.content == unknown.content
    assert dict(known.headers) == dict(unknown.headers)


def test_export_tars_are_byte_stable(app, client):
    """Each download was a different tar (every member's mtime was 'now'); now the job's finish time."""
    import time

    job = run_job(app, client, upload(client).json()["id"], per_class=2)
    for params in ({}, {"format": "webdataset"}, {"format": "webdataset", "shard": 0, "shard_size": 3}):
        first = client.get(f"/v1/jobs/{job['id']}/export", params=params).content
        time.sleep(1.1)  # mtimes have one-second resolution
        assert client.get(f"/v1/jobs/{job['id']}/export", params=params).content == first, params
        members = tarfile.open(fileobj=io.BytesIO(first)).getmembers()
        assert {m.mtime for m in members} == {int(job["finished"])}
        assert {(m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, "", "", 0o644)}


def test_job_image_urls_take_the_key_in_the_url(tmp_path):
    """ClipClient users and <img src> cannot send a header: ?api_key= works on image URLs as on /knn-service."""
    from retrogen.service.api.main import create_app

    key = "image-key-123456"
    app = create_app(make_settings(tmp_path / "data", api_keys=[key]), methods=fake_registry(), start_worker=False)
    keyed = TestClient(app, headers={"X-API-Key": key})
    job = run_job(app, keyed, upload(keyed).json()["id"], per_class=1)
    url = keyed.get(f"/v1/jobs/{job['id']}/results").json()["items"][0]["url"]
    bare = TestClient(app)
    assert bare.get(url).status_code == 401
    assert bare.get(url, params={"api_key": "wrong-key-0000"}).status_code == 401
    r = bare.get(url, params={"api_key": key})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    # only image URLs: the rest of the API still wants a header
    assert bare.get(f"/v1/jobs/{job['id']}/results", params={"api_key": key}).status_code == 401
