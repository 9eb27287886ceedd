"""Content-addressed storage through fsspec: a local folder, fsspec's in-memory store, and a real S3-compatible
endpoint on loopback (moto's server mode, reached through s3fs as AWS S3 or MinIO would be)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from retrogen.errors import NotFoundError
from retrogen.service.domain.storage import Store, tree_hash
from tests.service_fakes import dataset_files, fake_registry, make_settings, zip_bytes

pytest_plugins = ("tests.s3_server",)  # one moto server per session, whichever module starts it

STORES = ["local", "memory", "s3"]


@pytest.fixture
def store_url(request, tmp_path) -> str:
    """The store URL of the test's ``url`` parameter: a folder, a fresh memory:// root or a fresh S3 bucket."""
    kind = request.param
    if kind == "local":
        return str(tmp_path / "store")
    if kind == "memory":
        return f"memory://retrogen-{uuid.uuid4().hex}"
    return request.getfixturevalue("s3_endpoint").new_bucket() + "/retrogen"


def _tree(root, files):
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("store_url", STORES, indirect=True)
def test_put_read_and_cache(tmp_path, store_url):
    store = Store(store_url, tmp_path / "cache")
    files = dataset_files(per_class=1)
    src = _tree(tmp_path / "src", files)
    key = store.put_tree("datasets", src)
    assert key == f"datasets/{tree_hash(src)}" and store.exists(key)
    assert store.put_tree("datasets", src) == key  # same content: same address, stored once
    assert store.files(key) == sorted(files)
    assert store.read_bytes(key, "cat/0.png") == files["cat/0.png"]
    local = store.local_dir(key)
    assert (local / "dog/0.png").read_bytes() == files["dog/0.png"]
    assert store.local == (not store_url.startswith(("memory:", "s3:")))
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


@pytest.mark.parametrize("store_url", ["memory", "s3"], indirect=True)
def test_service_on_an_object_store_url(tmp_path, store_url):
    from retrogen.service.api.main import create_app

    app = create_app(make_settings(tmp_path / "data", storage_url=store_url), methods=fake_registry(),
                     start_worker=False)
    client = TestClient(app)
    ds = client.post("/v1/datasets", files={"file": ("d.zip", zip_bytes(dataset_files()), "application/zip")}).json()
    job = client.post("/v1/jobs", json={"dataset": ds["id"], "method": "fake-retrieval", "per_class": 2}).json()
    assert app.state.worker.run_once("retrieval") == job["id"]
    items = client.get(f"/v1/jobs/{job['id']}/results").json()["items"]
    assert len(items) == 4 and client.get(items[0]["url"]).status_code == 200
    assert not (tmp_path / "data" / "store").exists()  # everything went to the object store


def _race_put(url: str, cache: str, src: str, barrier, results) -> None:
    """One racer (thread or process): wait for the others, then store the same tree."""
    store = Store(url, cache)
    barrier.wait()
    try:
        key = store.put_tree("datasets", src)
        assert (store.local_dir(key) / "cat/0.png").read_bytes() == (Path(src) / "cat/0.png").read_bytes()
        results.put(("ok", key))
    except BaseException as e:  # reported to the test, which fails on it
        results.put(("error", f"{type(e).__name__}: {e}"))


def _check_stored(store: Store, key: str, files: dict[str, bytes]) -> None:
    assert store.exists(key)
    assert store.files(key) == sorted(files), "the stored tree holds exactly the source's files"
    for rel, data in files.items():
        assert store.read_bytes(key, rel) == data
    assert (store.local_dir(key) / "cat/0.png").read_bytes() == files["cat/0.png"]
    staging = f"{store.root}/staging"
    assert not store.fs.exists(staging) or not store.fs.ls(staging), "no staging folder left behind"


@pytest.mark.parametrize("store_url", STORES, indirect=True)
def test_concurrent_puts_of_the_same_tree_in_threads(tmp_path, store_url):
    """12 threads store the same content at once, 5 rounds: every put succeeds and the tree stays exact."""
    import queue
    import threading

    files = dataset_files(per_class=3)
    src = _tree(tmp_path / "src", files)
    for _ in range(5):
        barrier, results = threading.Barrier(12), queue.Queue()
        threads = [threading.Thread(target=_race_put, args=(store_url, str(tmp_path / "cache"), str(src), barrier,
                                                            results)) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        outcomes = [results.get_nowait() for _ in range(12)]
        assert {o for o in outcomes} == {("ok", f"datasets/{tree_hash(src)}")}, outcomes
        store = Store(store_url, tmp_path / "cache")
        _check_stored(store, outcomes[0][1], files)
        store.delete(outcomes[0][1])  # the next round races on an empty store again


def test_concurrent_puts_of_the_same_tree_in_processes(tmp_path):
    """Processes sharing one local store race on the same content, also onto a crashed write's leftovers."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    files = dataset_files(per_class=3)
    src = _tree(tmp_path / "src", files)
    root, key = tmp_path / "store", f"datasets/{tree_hash(src)}"
    for leftovers in (False, True, False):
        if leftovers:  # an earlier write cut off before its marker: a partial file, a foreign one
            _tree(root / key, {"cat/0.png": b"partial", "stray.txt": b"x"})
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_race_put, args=(str(root), str(tmp_path / "cache"), str(src), barrier, results))
                 for _ in range(6)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
        assert set(outcomes) == {("ok", key)}, outcomes
        store = Store(str(root), tmp_path / "cache")
        _check_stored(store, key, files)
        assert sorted(p.relative_to(root / key).as_posix() for p in (root / key).rglob("*") if p.is_file()) == \
            sorted([*files, ".complete"]), "nothing nested or left over inside the tree"
        store.delete(key)


def test_a_cache_copy_cut_off_before_its_marker_is_replaced(tmp_path):
    files = dataset_files(per_class=1)
    store = Store(f"memory://retrogen-{uuid.uuid4().hex}", tmp_path / "cache")
    key = store.put_tree("datasets", _tree(tmp_path / "src", files))
    _tree(tmp_path / "cache" / key, {"cat/0.png": b"partial"})  # an interrupted copy (or delete): no marker
    local = store.local_dir(key)
    assert (local / "cat/0.png").read_bytes() == files["cat/0.png"] and (local / ".complete").is_file()


def test_a_completed_tree_is_never_replaced(tmp_path):
    files = dataset_files(per_class=1)
    src = _tree(tmp_path / "src", files)
    store = Store(str(tmp_path / "store"), tmp_path / "cache")
    key = store.put_tree("datasets", src)
    marker = tmp_path / "store" / key / ".complete"
    inode, stamp = marker.stat().st_ino, marker.read_bytes()
    assert store.put_tree("datasets", src) == key
    assert marker.stat().st_ino == inode and marker.read_bytes() == stamp


def test_a_replica_sees_a_tree_that_another_host_completed_after_it_looked(tmp_path, request):
    """Replicas share the bucket, not a listing cache: one that listed a half-written tree sees it complete
    once another process has written it (s3fs keeps listings forever unless told not to)."""
    import subprocess
    import sys

    url = request.getfixturevalue("s3_endpoint").new_bucket() + "/retrogen"
    files = dataset_files(per_class=1)
    src = _tree(tmp_path / "src", files)
    mine, key = Store(url, tmp_path / "cache"), f"datasets/{tree_hash(src)}"
    mine.fs.pipe_file(f"{mine.root}/{key}/cat/0.png", files["cat/0.png"])  # another host's write, under way
    assert not mine.exists(key) and mine.fs.find(f"{mine.root}/{key}")  # ... and this replica looks at it
    code = ("import sys; from retrogen.service.domain.storage import Store; "
            "Store(sys.argv[1], sys.argv[2]).put_tree('datasets', sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, url, str(tmp_path / "cache2"), str(src)], check=True, timeout=120)
    assert mine.exists(key) and mine.files(key) == sorted(files)


@pytest.mark.parametrize("store_url", STORES, indirect=True)
def test_cleaning_staging_spares_uploads_in_progress(tmp_path, store_url):
    """A worker starting up removes crashed uploads' staging folders, never one another replica is writing
    (an object store's folder has no time of its own: its newest object dates it)."""
    store = Store(store_url, tmp_path / "cache")
    part = f"{store.root}/staging/{uuid.uuid4().hex}/cat/0.png"
    store.fs.makedirs(part.rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe_file(part, b"uploading")
    store.clean_staging()  # the default: older than an hour
    assert store.fs.exists(part)
    store.clean_staging(older_than_s=-60)  # everything dated counts as old
    assert not store.fs.exists(part)
