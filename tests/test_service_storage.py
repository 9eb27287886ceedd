"""Content-addressed storage through fsspec: a local folder and an object-store-like URL (``memory://``)."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from retrogen.errors import NotFoundError
from retrogen.service.domain.storage import Store, tree_hash
from tests.service_fakes import dataset_files, fake_registry, make_settings, zip_bytes


def _tree(root, files):
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("url", ["local", "memory"])
def test_put_read_and_cache(tmp_path, url):
    store = Store(str(tmp_path / "store") if url == "local" else f"memory://retrogen-{uuid.uuid4().hex}",
                  tmp_path / "cache")
    files = dataset_files(per_class=1)
    src = _tree(tmp_path / "src", files)
    key = store.put_tree("datasets", src)
    assert key == f"datasets/{tree_hash(src)}" and store.exists(key)
    assert store.put_tree("datasets", src) == key  # same content: same address, stored once
    assert store.files(key) == sorted(files)
    assert store.read_bytes(key, "cat/0.png") == files["cat/0.png"]
    local = store.local_dir(key)
    assert (local / "dog/0.png").read_bytes() == files["dog/0.png"]
    assert store.local == (url == "local")
    for bad in ("../x", "cat/../../x", ".complete", "/etc/passwd"):
        with pytest.raises(NotFoundError):
            store.read_bytes(key, bad)
    with pytest.raises(NotFoundError):
        store.read_bytes("datasets/../../etc", "passwd")
    # a tree whose write was cut off before its marker is invisible, and a later put replaces it
    other = _tree(tmp_path / "other", {"cat/1.png": files["cat/0.png"]})
    half = f"datasets/{tree_hash(other)}"
    store.fs.makedirs(f"{store.root}/{half}/cat", exist_ok=True)
    store.fs.pipe_file(f"{store.root}/{half}/cat/1.png", b"partial")
    assert not store.exists(half)
    assert store.put_tree("datasets", other) == half and store.read_bytes(half, "cat/1.png") == files["cat/0.png"]
    store.delete(key)
    assert not store.exists(key)


def test_service_on_an_object_store_url(tmp_path):
    from retrogen.service.api.main import create_app

    url = f"memory://retrogen-{uuid.uuid4().hex}"
    app = create_app(make_settings(tmp_path / "data", storage_url=url), methods=fake_registry(), start_worker=False)
    client = TestClient(app)
    ds = client.post("/v1/datasets", files={"file": ("d.zip", zip_bytes(dataset_files()), "application/zip")}).json()
    job = client.post("/v1/jobs", json={"dataset": ds["id"], "method": "fake-retrieval", "per_class": 2}).json()
    assert app.state.worker.run_once("retrieval") == job["id"]
    items = client.get(f"/v1/jobs/{job['id']}/results").json()["items"]
    assert len(items) == 4 and client.get(items[0]["url"]).status_code == 200
    assert not (tmp_path / "data" / "store").exists()  # everything went to the object store
