"""Indexes built into an object store and opened from one (``retrieval/index_store.py``), on a real S3-compatible
endpoint on loopback (moto's server mode, reached through s3fs): a build to ``s3://`` equals the local build and
publishes its manifest last; a killed driver resumes from the store on a fresh work dir without embedding again;
readers copy into a local cache only what is missing or changed, never outside it; the CLI reports a store it
cannot use in one line."""

import io
import json
import sys
import tarfile
import uuid

import numpy as np
import pytest
from fsspec.core import url_to_fs
from fsspec.implementations.memory import MemoryFileSystem
from typer.testing import CliRunner

from retrogen import cli
from retrogen.errors import NotFoundError
from retrogen.index_builder.build import build_index
from retrogen.index_builder.config import IndexBuildConfig
from retrogen.index_builder.errors import BuildMismatchError
from retrogen.retrieval import index_store
from retrogen.retrieval.embedders import create_embedder
from retrogen.retrieval.errors import IndexFormatError, IndexNotFoundError
from retrogen.retrieval.index import CorpusIndex
from retrogen.retrieval.index_directory import is_layout_name
from retrogen.retrieval.index_store import RemoteIndex
from retrogen.service.domain.indexes import IndexRegistry
from tests.conftest import write_clip_retrieval_output
from tests.test_index_build import encode, noise_image

pytest_plugins = ("tests.s3_server",)  # one moto server per session, whichever module starts it

CONFIG = IndexBuildConfig(shard_size=4, batch_size=4, num_workers=1, index_type="flat")


class Crash(Exception):
    pass


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """The default staging and cache folders (``$XDG_CACHE_HOME/retrogen``) under the test's own folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of 10 images and an unreadable file, and a tar of 4 captioned images: 15 records, 4 shards."""
    root = tmp_path_factory.mktemp("store_corpus")
    folder = root / "images"
    folder.mkdir()
    for i in range(10):
        noise_image(i, (20 + i, 16)).save(folder / f"img{i:02d}.png")
    (folder / "zz_broken.jpg").write_text("not an image")
    tar = root / "00000.tar"
    with tarfile.open(tar, "w") as t:
        for i in range(4):
            for name, data in ((f"{i:09d}.jpg", encode(noise_image(50 + i), "JPEG")), (f"{i:09d}.txt", f"cap {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return [str(folder), str(tar)]


@pytest.fixture(scope="module")
def local_index(corpus, tmp_path_factory, mean_colour_embedder):
    out = tmp_path_factory.mktemp("local") / "idx"
    build_index(corpus, out, embedder=mean_colour_embedder, config=CONFIG)
    return CorpusIndex.open(out)


def counting_embedder():
    """A fresh ``meancolour`` embedder and the list of batch sizes it embeds."""
    embedder, calls = create_embedder("meancolour"), []
    inner = embedder.embed_preprocessed

    def counted(batch):
        calls.append(len(batch))
        return inner(batch)

    embedder.embed_preprocessed = counted
    return embedder, calls


@pytest.fixture
def uploads(monkeypatch):
    """The layout names uploaded (``build_state.json`` included), in order."""
    names = []
    upload, state = RemoteIndex.upload, RemoteIndex.write_build_state

    def spy_upload(self, local, name):
        names.append(name)
        upload(self, local, name)

    def spy_state(self, parameters):
        names.append("build_state.json")
        state(self, parameters)

    monkeypatch.setattr(RemoteIndex, "upload", spy_upload)
    monkeypatch.setattr(RemoteIndex, "write_build_state", spy_state)
    return names


@pytest.fixture
def downloads(monkeypatch):
    names = []
    download = RemoteIndex.download

    def spy(self, name, dest):
        names.append(name)
        return download(self, name, dest)

    monkeypatch.setattr(RemoteIndex, "download", spy)
    return names


def remote_objects(url: str) -> dict:
    """Every object under ``url``: name relative to it -> listing entry."""
    fs, root = url_to_fs(url, use_listings_cache=False)
    return {p[len(root) + 1:]: info for p, info in fs.find(root, detail=True).items()}


def shard_names(count: int) -> list[str]:
    return [name for n in range(count) for name in (f"img_emb/img_emb_{n:04d}.npy", f"metadata/metadata_{n:04d}.parquet")]


def assert_same_index(a: CorpusIndex, b: CorpusIndex) -> None:
    """Same rows by id: metadata equal, vectors within 1e-5, same skipped files and shards."""
    assert a.ntotal == b.ntotal
    ids = range(a.ntotal)
    assert a.metadata(ids) == b.metadata(ids)
    np.testing.assert_allclose(a.embeddings(ids).astype(np.float32), b.embeddings(ids).astype(np.float32), atol=1e-5)
    assert a.manifest.skipped == b.manifest.skipped and a.manifest.shards == b.manifest.shards
    assert a.manifest.build["parameters"] == b.manifest.build["parameters"]


def test_build_to_s3_equals_the_local_build_and_publishes_the_manifest_last(s3_endpoint, corpus, local_index,
                                                                            uploads, tmp_path):
    url = s3_endpoint.new_bucket() + "/idx"
    events = []
    m = build_index(corpus, url, embedder=create_embedder("meancolour"), config=CONFIG, progress=events.append)
    assert m.count == 14 and len(m.shards) == 4 and m.skipped["count"] == 1 and m.captions["rows"] == 4
    layout = ["captions.sqlite", "image.index", "manifest.json", *shard_names(4)]
    assert sorted(remote_objects(url)) == sorted(layout)  # the build state is gone, as locally
    # the build state first, each shard as it is committed (vectors, then metadata), the manifest last
    assert uploads[0] == "build_state.json" and uploads[-1] == "manifest.json" and uploads.count("manifest.json") == 1
    assert uploads[1:9] == shard_names(4) and set(uploads[9:-1]) == {"image.index", "captions.sqlite"}
    assert max(e.done for e in events if e.stage == "upload") == len(layout)
    staged = tmp_path / "xdg" / "retrogen" / "index-builds" / index_store.url_key(url)
    assert (staged / "manifest.json").is_file(), "staged under the default work dir"
    assert m.index_id == local_index.manifest.index_id, "named after the URL's last part, as after a folder's name"

    remote = CorpusIndex.open(url)  # into the default cache
    assert remote.directory.path == tmp_path / "xdg" / "retrogen" / "indexes" / index_store.url_key(url)
    assert_same_index(local_index, remote)
    queries = local_index.embeddings(range(6)).astype(np.float32)
    for a, b in zip(local_index.search(queries, 4), remote.search(queries, 4), strict=True):
        np.testing.assert_array_equal(a, b)
    assert remote.search_captions("cap", 10) == local_index.search_captions("cap", 10)

    # the same command again, from another machine: already complete, nothing embedded or uploaded
    embedder, calls = counting_embedder()
    uploads.clear()
    again = build_index(corpus, url, embedder=embedder, config=CONFIG, work_dir=tmp_path / "elsewhere")
    assert again.model_dump(mode="json") == m.model_dump(mode="json") and not calls and not uploads


def test_a_killed_driver_resumes_from_the_store_on_a_fresh_work_dir(s3_endpoint, corpus, local_index,
                                                                    uploads, downloads, tmp_path):
    url = s3_endpoint.new_bucket() + "/idx"

    def die_after_two_shards(event):  # the driver is killed once shards 0 and 1 are on the store
        if event.stage == "upload" and event.done >= 4:
            raise Crash("driver killed")

    with pytest.raises(Crash):
        build_index(corpus, url, embedder=create_embedder("meancolour"), config=CONFIG, work_dir=tmp_path / "first",
                    progress=die_after_two_shards)
    before = remote_objects(url)
    assert sorted(before) == sorted(["build_state.json", *shard_names(2)])
    with pytest.raises(IndexNotFoundError, match="has no manifest.json: not an index, or its build did not finish"):
        CorpusIndex.open(url, cache_dir=tmp_path / "cache")  # the manifest is the commit: no index yet
    assert not (tmp_path / "cache" / "manifest.json").exists()

    uploads.clear()
    embedder, calls = counting_embedder()
    events = []
    m = build_index(corpus, url, embedder=embedder, config=CONFIG, work_dir=tmp_path / "second",
                    progress=events.append)
    assert downloads == ["build_state.json", *shard_names(2)]
    assert m.build["resumed_from_shard"] == 2
    assert sum(calls) == sum(s["rows"] for s in m.shards[2:]), "shards 0 and 1 came down, not embedded again"
    assert not set(shard_names(2)) & set(uploads), "shards on the store are not uploaded again"
    after = remote_objects(url)
    assert {k: after[k]["ETag"] for k in shard_names(2)} == {k: before[k]["ETag"] for k in shard_names(2)}
    assert "build_state.json" not in after and "manifest.json" in after
    assert_same_index(local_index, CorpusIndex.open(url, cache_dir=tmp_path / "cache"))


def test_a_resume_uploads_what_the_store_lacks_without_embedding_it(s3_endpoint, corpus, local_index,
                                                                     uploads, downloads, tmp_path):
    url = s3_endpoint.new_bucket() + "/idx"
    work = tmp_path / "work"

    def die_after_two_shards(event):
        if event.stage == "upload" and event.done >= 4:
            raise Crash("driver killed")

    with pytest.raises(Crash):
        build_index(corpus, url, embedder=create_embedder("meancolour"), config=CONFIG, work_dir=work,
                    progress=die_after_two_shards)
    RemoteIndex(url).remove("metadata/metadata_0001.parquet")  # as if killed after the local commit of shard 1
    uploads.clear()
    embedder, calls = counting_embedder()
    m = build_index(corpus, url, embedder=embedder, config=CONFIG, work_dir=work)
    assert sum(calls) == sum(s["rows"] for s in m.shards[2:]) and not downloads
    assert "metadata/metadata_0001.parquet" in uploads
    assert not {"img_emb/img_emb_0000.npy", "metadata/metadata_0000.parquet", "img_emb/img_emb_0001.npy"} & set(uploads)
    assert_same_index(local_index, CorpusIndex.open(url, cache_dir=tmp_path / "cache"))


def test_a_reader_copies_once_and_again_only_what_a_changed_manifest_changed(s3_endpoint, corpus, local_index,
                                                                             downloads, tmp_path):
    url = s3_endpoint.new_bucket() + "/idx"
    build_index(corpus, url, embedder=create_embedder("meancolour"), config=CONFIG)
    cache = tmp_path / "cache"
    first = CorpusIndex.open(url, cache_dir=cache)
    assert sorted(downloads) == sorted(["image.index", "captions.sqlite", *shard_names(4)])
    downloads.clear()
    second = CorpusIndex.open(url, cache_dir=cache)
    assert downloads == [], "an up-to-date cache downloads nothing"
    assert_same_index(first, second)

    (cache / "img_emb" / "img_emb_0002.npy").write_bytes(b"damaged")  # a damaged copy is repaired
    CorpusIndex.open(url, cache_dir=cache)
    assert downloads == ["img_emb/img_emb_0002.npy"]
    downloads.clear()

    # the index rebuilt with other arguments: the new manifest brings down the files that changed
    rebuilt = build_index(corpus, url, embedder=create_embedder("meancolour"), config=CONFIG.replace(dtype="float32"),
                          overwrite=True)
    third = CorpusIndex.open(url, cache_dir=cache)
    assert third.manifest.model_dump(mode="json") == rebuilt.model_dump(mode="json")
    assert third.embeddings([0]).dtype == np.float32
    assert set(shard_names(4)[::2]) | {"image.index"} <= set(downloads), "new vectors, new FAISS index (same size)"
    np.testing.assert_allclose(third.embeddings(range(14)), local_index.embeddings(range(14)).astype(np.float32),
                               atol=2e-3)


def test_object_names_outside_the_layout_never_leave_the_cache(s3_endpoint, corpus, tmp_path):
    import boto3

    url = s3_endpoint.new_bucket() + "/deep/idx"
    bucket = url.split("/")[2]
    build_index(corpus, url, embedder=create_embedder("meancolour"), config=CONFIG)
    s3 = boto3.client("s3")  # endpoint and credentials from the AWS_* environment, as s3fs takes them
    for key in ("deep/idx/../../evil", "deep/idx/img_emb/../../../evil.npy", "deep/idx//tmp/evil", "deep/idx/x/evil"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"evil")
    cache = tmp_path / "a" / "b" / "cache"
    CorpusIndex.open(url, cache_dir=cache)  # stray objects are not index files: never copied
    assert not list(tmp_path.rglob("*evil*"))

    manifest = json.loads(RemoteIndex(url).read_bytes("manifest.json"))
    manifest["shards"][0]["emb"] = "img_emb/../../../evil.npy"
    s3.put_object(Bucket=bucket, Key="deep/idx/manifest.json", Body=json.dumps(manifest).encode())
    with pytest.raises(IndexFormatError, match="names a file outside the index layout"):
        CorpusIndex.open(url, cache_dir=tmp_path / "fresh")
    assert not list(tmp_path.rglob("*evil*"))
    with pytest.raises(IndexFormatError, match="not a file of the index layout"):
        RemoteIndex(url).key("../../evil")


def test_overwrite_replaces_a_build_and_never_other_objects(s3_endpoint, corpus, tmp_path):
    bucket = s3_endpoint.new_bucket()
    fs, _ = url_to_fs(bucket, use_listings_cache=False)
    fs.pipe_file(f"{bucket[5:]}/mine/notes.txt", b"someone's")
    for overwrite, message in ((False, "not empty and holds no index build"), (True, "holds objects but no index build")):
        with pytest.raises(BuildMismatchError, match=message):
            build_index(corpus, f"{bucket}/mine", embedder=create_embedder("meancolour"), config=CONFIG,
                        overwrite=overwrite)
    assert list(remote_objects(f"{bucket}/mine")) == ["notes.txt"]

    url = f"{bucket}/idx"
    build_index(corpus, url, embedder=create_embedder("meancolour"), config=CONFIG)
    with pytest.raises(BuildMismatchError, match="other arguments"):
        build_index(corpus, url, embedder=create_embedder("meancolour"), config=CONFIG.replace(dtype="float32"))
    fs.pipe_file(f"{bucket[5:]}/idx/notes.txt", b"kept")
    m = build_index(corpus, url, embedder=create_embedder("meancolour"), config=CONFIG.replace(dtype="float32"),
                    overwrite=True)
    assert m.dtype == "float32" and "notes.txt" in remote_objects(url)
    assert CorpusIndex.open(url, cache_dir=tmp_path / "c").embeddings([0]).dtype == np.float32


def test_a_store_without_atomic_uploads_gets_temporary_names_then_moves(corpus, local_index, tmp_path, monkeypatch):
    monkeypatch.setattr(index_store, "ATOMIC_UPLOADS", frozenset())
    moves = []
    mv = MemoryFileSystem.mv

    def spy(self, path1, path2, **kw):
        moves.append((path1, path2))
        return mv(self, path1, path2, **kw)

    monkeypatch.setattr(MemoryFileSystem, "mv", spy)
    url = f"memory://retrogen-{uuid.uuid4().hex}/idx"
    build_index(corpus, url, embedder=create_embedder("meancolour"), config=CONFIG)
    assert moves and all(src.rsplit("/", 1)[1].startswith(".") and src.endswith(".tmp") for src, _ in moves)
    assert all(is_layout_name(name) for name in remote_objects(url)), "no temporary object is left"
    assert_same_index(local_index, CorpusIndex.open(url, cache_dir=tmp_path / "c"))


def test_the_service_serves_an_index_from_its_url(s3_endpoint, corpus, local_index, tmp_path):
    bucket = s3_endpoint.new_bucket()
    build_index(corpus, f"{bucket}/idx", embedder=create_embedder("meancolour"), config=CONFIG)
    registry = IndexRegistry({"corpus": {"path": f"{bucket}/idx"}, "missing": {"path": f"{bucket}/nothing"}},
                             cache_dir=tmp_path / "cache")
    assert registry.manifest("corpus").count == 14 and not (tmp_path / "cache").exists(), "a manifest read copies nothing"
    loaded = registry.get("corpus")
    assert loaded.path == tmp_path / "cache" / index_store.url_key(f"{bucket}/idx")
    assert_same_index(local_index, loaded.corpus)
    with pytest.raises(NotFoundError) as e:
        registry.get("missing")
    assert "<index missing>" in str(e.value) and bucket not in str(e.value)


def test_cli_builds_to_s3_and_reports_a_store_it_cannot_use_in_one_line(s3_endpoint, corpus, tmp_path,
                                                                        monkeypatch, capsys, mean_colour_embedder):
    url = s3_endpoint.new_bucket() + "/idx"
    args = ["index", "build", "--source", corpus[0], "--source", corpus[1], "--embedder", "meancolour",
            "--shard-size", "4", "--index-type", "flat", "--quiet"]
    res = CliRunner().invoke(cli.app, [*args, "--out", url, "--work-dir", str(tmp_path / "work")])
    assert res.exit_code == 0, res.output
    assert f"index {url}: 14 vectors (dim 16), Flat, exact, 1 skipped" in res.output
    assert (tmp_path / "work" / "manifest.json").is_file()
    info = CliRunner().invoke(cli.app, ["index", "info", url, "--json"])
    assert info.exit_code == 0 and json.loads(info.output)["count"] == 14

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "S3cr3t-only-in-the-environment")  # moto takes any
    missing = f"s3://retrogen-missing-{uuid.uuid4().hex[:8]}/idx"
    for out, message in ((missing, f"cannot list {missing}: The specified bucket does not exist"),
                         ("s3://KEYID:hunter2-secret@bucket/idx", "cannot list s3://bucket/idx"),
                         ("nosuchproto://bucket/idx", "Protocol not known: nosuchproto"),
                         ("s3://", "names no bucket or folder")):
        monkeypatch.setattr(sys, "argv", ["retrogen", *args, "--out", out])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        assert exc.value.code == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
        assert "hunter2" not in err and "S3cr3t" not in err and "Traceback" not in err


def test_an_ondisk_index_and_an_import_go_through_the_store(s3_endpoint, corpus, local_index, tmp_path):
    from retrogen.retrieval.index_directory import ondisk_lists

    bucket = s3_endpoint.new_bucket()
    config = CONFIG.replace(faiss_storage="ondisk", index_type="IVF2,Flat", num_recall_queries=4)
    build_index(corpus, f"{bucket}/ondisk", embedder=create_embedder("meancolour"), config=config)
    assert "image.ivfdata" in remote_objects(f"{bucket}/ondisk")
    index = CorpusIndex.open(f"{bucket}/ondisk", cache_dir=tmp_path / "ondisk")
    assert ondisk_lists(index.faiss_index) is not None
    _, found = index.search(local_index.embeddings(range(14)).astype(np.float32), 1, nprobe=2)
    assert found[:, 0].tolist() == list(range(14))

    src = tmp_path / "clip"
    write_clip_retrieval_output(src, 40)
    res = CliRunner().invoke(cli.app, ["index", "import", "--from", str(src), "--out", f"{bucket}/imported",
                                       "--index-type", "flat", "--quiet"])
    assert res.exit_code == 0, res.output
    imported = CorpusIndex.open(f"{bucket}/imported", cache_dir=tmp_path / "imported")
    assert imported.ntotal == 40 and imported.metadata([3])[0]["source"] == "/d/3.jpg"
