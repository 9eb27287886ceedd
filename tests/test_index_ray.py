"""``--engine ray``: the index build on a local Ray cluster (started here, 2 CPUs, shared by the file's tests),
compared with the local build of the same sources; and the large-corpus FAISS path (per-shard parts filled by
Ray tasks, merged on disk) compared with the same IVF index built in one piece."""

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

from retrogen import cli
from retrogen.index_builder.build import build_index, finish_index
from retrogen.index_builder.config import IndexBuildConfig
from retrogen.index_builder.errors import IndexBuildError
from retrogen.retrieval.embedders import create_embedder
from retrogen.retrieval.index import CorpusIndex
from retrogen.retrieval.index_directory import STATE_FILE, IndexDirectory, ondisk_lists
from tests.test_index_build import encode, noise_image, png_bomb_header

pytest_plugins = ("tests.s3_server",)  # one moto server per session, whichever module starts it

try:
    import ray
except ImportError:  # the `distributed` extra
    ray = None
    if os.environ.get("CI") == "true":
        raise
pytestmark = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install 'retrogen[distributed]')")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local cluster for the module: Ray's start costs seconds."""
    for key, value in (("RAY_DEDUP_LOGS", "0"), ("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_DATA_DISABLE_PROGRESS_BARS", "1"),
                       ("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")):
        os.environ.setdefault(key, value)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder (with three bad files) and an img2dataset-style tar: 27 records, 3 of them unreadable."""
    root = tmp_path_factory.mktemp("ray_corpus")
    folder = root / "images"
    for i in range(16):
        sub = folder / f"part{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        noise_image(i, (24 + i, 20)).save(sub / f"img{i:02d}.png")
    bad = folder / "zbad"
    bad.mkdir()
    full = encode(noise_image(99, (64, 64)), "JPEG")
    (bad / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (bad / "text.jpg").write_text("not an image")
    (bad / "bomb.png").write_bytes(png_bomb_header())
    tar = root / "00000.tar"
    with tarfile.open(tar, "w") as t:
        for i in range(8):
            key = f"{i:09d}"
            for name, data in ((f"{key}.jpg", encode(noise_image(300 + i), "JPEG")), (f"{key}.txt", f"cap {i}".encode()),
                               (f"{key}.json", json.dumps({"url": f"http://x/{key}", "punsafe": 0.1 * i}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return [str(folder), str(tar)]


@pytest.fixture(scope="module")
def clip_name(tiny_open_clip_dir):
    """A real (tiny, random) open_clip model by name: each Ray actor builds its own from the same folder."""
    return f"open_clip:local-dir:{tiny_open_clip_dir}"


CONFIG = IndexBuildConfig(shard_size=5, batch_size=4, num_workers=1, index_type="flat")


@pytest.fixture(scope="module")
def local_build(corpus, clip_name, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "idx"
    build_index(corpus, out, embedder=create_embedder(clip_name), config=CONFIG)
    return CorpusIndex.open(out)


def ray_engine(**kw):
    from retrogen.index_builder.ray_build import RayEngine

    return RayEngine(max_actors=1, block_records=4, **kw)


def assert_same_index(a: CorpusIndex, b: CorpusIndex) -> None:
    """Same rows by id: metadata equal, vectors within 1e-5, same skipped files, same shards."""
    assert a.ntotal == b.ntotal
    ids = range(a.ntotal)
    assert a.metadata(ids) == b.metadata(ids)
    np.testing.assert_allclose(a.embeddings(ids).astype(np.float32), b.embeddings(ids).astype(np.float32), atol=1e-5)
    assert a.manifest.skipped == b.manifest.skipped
    assert a.manifest.shards == b.manifest.shards and a.manifest.sources == b.manifest.sources
    assert a.manifest.build["parameters"] == b.manifest.build["parameters"]


def test_ray_build_equals_local_build(ray_cluster, corpus, clip_name, local_build, tmp_path):
    m = build_index(corpus, tmp_path / "idx", embedder=create_embedder(clip_name), config=CONFIG, engine=ray_engine())
    assert m.build["engine"] == "ray" and m.build["ray"]["cluster_cpus"] == 2.0
    assert local_build.manifest.build["engine"] == "local"
    assert m.count == 24 and m.skipped["count"] == 3 and len(m.shards) == 6
    reasons = {f["path"].rsplit("/", 1)[-1]: f["reason"] for f in m.skipped["files"]}
    assert reasons["bomb.png"] == "too_many_pixels" and reasons["text.jpg"] == "not_an_image"
    ray_index = CorpusIndex.open(tmp_path / "idx")
    assert_same_index(local_build, ray_index)
    assert ray_index.metadata([23])[0]["caption"] == "cap 7"


def test_decode_tasks_stay_apart_from_the_embedding_actors(ray_cluster, corpus, clip_name, capsys):
    """Ray Data fuses a task stage into the next actor stage when their remote arguments match: the actors would
    then decode too, one batch at a time per model. The decode tasks' declared memory keeps them apart, with no
    argument Ray has deprecated (``ray_remote_args``)."""
    import warnings

    from retrogen.index_builder.sources import resolve_sources, scan_sources

    records, _ = scan_sources(resolve_sources(corpus))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RayDeprecationWarning (or any other) fails the test
        ds = ray_engine().dataset(records, 0, create_embedder(clip_name), CONFIG)
    ds.explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "ActorPoolMapOperator[MapBatches(EmbedActor)]" in optimized, optimized
    assert "TaskPoolMapOperator[MapBatches(decode_batch)]" in optimized, optimized


def test_ray_build_to_an_object_store(ray_cluster, corpus, clip_name, local_build, s3_endpoint, tmp_path):
    """The driver commits each shard in its staging folder and uploads it (docs/index-ray.md "Output")."""
    url = s3_endpoint.new_bucket() + "/idx"
    m = build_index(corpus, url, embedder=create_embedder(clip_name), config=CONFIG, engine=ray_engine(),
                    work_dir=tmp_path / "staging")
    assert m.build["engine"] == "ray" and m.count == 24
    assert_same_index(local_build, CorpusIndex.open(url, cache_dir=tmp_path / "cache"))


class Crash(Exception):
    pass


def test_ray_build_resumes_per_shard_after_a_killed_driver(ray_cluster, corpus, clip_name, local_build, tmp_path):
    out = tmp_path / "idx"

    def crash(event):  # the driver dies once three shards are committed
        if event.stage == "embed" and len(list((out / "metadata").glob("*.parquet"))) >= 3:
            raise Crash("driver killed")

    with pytest.raises(Crash):
        build_index(corpus, out, embedder=create_embedder(clip_name), config=CONFIG, engine=ray_engine(),
                    progress=crash)
    assert not (out / "manifest.json").exists() and (out / STATE_FILE).exists()
    committed = sorted((out / "metadata").glob("*.parquet"))
    assert len(committed) >= 3
    (out / "img_emb" / committed[-1].name.replace("metadata", "img_emb").replace(".parquet", ".npy")).write_bytes(
        b"torn")  # the last committed shard corrupted: it is redone, the ones before it are kept
    kept = {p: p.stat().st_mtime_ns for d in ("img_emb", "metadata") for p in sorted((out / d).iterdir())
            if int(p.stem.rsplit("_", 1)[1]) < len(committed) - 1}
    events = []
    m = build_index(corpus, out, embedder=create_embedder(clip_name), config=CONFIG, engine=ray_engine(),
                    progress=events.append)
    assert m.build["resumed_from_shard"] == len(committed) - 1
    assert {p: p.stat().st_mtime_ns for p in kept} == kept, "finished shards were not recomputed"
    assert min(e.done for e in events if e.stage == "embed") > 5 * (len(committed) - 1)
    assert_same_index(local_build, CorpusIndex.open(out))


def test_ondisk_ivf_parts_on_ray_equal_the_index_built_in_one_piece(ray_cluster, tmp_path):
    import faiss

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((24, 32))
    x = (centres[rng.integers(0, 24, 4000)] + 0.4 * rng.standard_normal((4000, 32))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    directory = IndexDirectory(tmp_path / "idx")
    directory.prepare()
    shards = [directory.write_shard(n, x[n * 1000:(n + 1) * 1000], [{"key": str(i)} for i in range(1000)],
                                    first_id=n * 1000, dtype="float32", start=n * 1000, end=(n + 1) * 1000)
              for n in range(4)]
    entry = {"name": "synthetic", "dim": 32, "normalized": True, "modalities": ["image"]}
    config = IndexBuildConfig(dtype="float32", faiss_storage="ondisk", num_recall_queries=200)  # auto: IVF-PQ
    m = finish_index(directory, shards, embedder_entry=entry, config=config, sources=[], params={},
                     map_parts=ray_engine().map_parts)
    assert m.faiss["storage"] == "ondisk" and m.faiss["parts"] == 4 and "Refine" not in m.faiss["factory"]
    assert m.faiss["factory"].startswith("IVF") and m.recall["met"]
    assert sorted(p.name for p in directory.path.iterdir()) == ["captions.sqlite", "image.index", "image.ivfdata",
                                                                "img_emb", "manifest.json", "metadata"]
    moved = tmp_path / "moved"
    shutil.move(directory.path, moved)  # faiss stored the absolute name of the lists file; the reader re-points it
    corpus = CorpusIndex.open(moved)
    assert ondisk_lists(corpus.faiss_index) is not None and ondisk_lists(corpus.faiss_index).read_only
    # the same trained quantizer + codebooks, filled in one piece, in row order, in RAM
    one = faiss.read_index(str(moved / "image.index"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    ivf = faiss.extract_index_ivf(one)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns it now
    ivf.ntotal = one.ntotal = 0
    one.add_with_ids(x, np.arange(len(x)))
    nprobe = m.faiss["search_defaults"]["nprobe"]
    q = x[rng.choice(len(x), 100, replace=False)] + 0.05 * rng.standard_normal((100, 32)).astype(np.float32)
    _, want = one.search(q, 10, params=faiss.SearchParametersIVF(nprobe=nprobe))
    _, got = corpus.search(q, 10, rerank_k_factor=1)
    np.testing.assert_array_equal(got, want)


def test_cli_engine_ray_with_an_ondisk_index(ray_cluster, corpus, clip_name, local_build, tmp_path):
    out = tmp_path / "idx"
    args = ["index", "build", "--out", str(out), "--embedder", clip_name, "--engine", "ray", "--quiet",
            "--shard-size", "5", "--batch-size", "4", "--faiss-storage", "ondisk", "--index-type", "IVF2,Flat",
            "--num-recall-queries", "4"]
    res = CliRunner().invoke(cli.app, [*args[:2], "--source", corpus[0], "--source", corpus[1], *args[2:]])
    assert res.exit_code == 0, res.output
    index = CorpusIndex.open(out)
    m = index.manifest
    assert m.build["engine"] == "ray" and m.faiss["storage"] == "ondisk" and m.faiss["factory"] == "IVF2,Flat"
    ids = range(index.ntotal)
    assert index.metadata(ids) == local_build.metadata(ids)
    _, found = index.search(local_build.embeddings(ids).astype(np.float32), 1, nprobe=2)
    assert found[:, 0].tolist() == list(ids)
    res = CliRunner().invoke(cli.app, ["index", "build", "--source", corpus[0], "--out", str(tmp_path / "x"),
                                       "--embedder", clip_name, "--ray-address", "auto"])
    assert isinstance(res.exception, IndexBuildError) and "--ray-address needs --engine ray" in str(res.exception)


class DiesOnce:
    """An embedder factory whose model kills its actor's process the first time it runs (``os._exit``, as a
    lost node or an OOM kill would), once per marker file."""

    def __init__(self, name: str, marker: str):
        self.name, self.marker = name, marker

    def __call__(self, device: str):
        embedder = create_embedder(self.name, device=device)
        embed, marker = embedder.embed_preprocessed, self.marker

        def dying(batch):
            if not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            return embed(batch)

        embedder.embed_preprocessed = dying
        return embedder


def test_ray_build_survives_a_killed_embedding_worker(ray_cluster, corpus, clip_name, local_build, tmp_path):
    """Ray Data restarts the dead actor and re-runs its batch: the build completes, equal to the local one."""
    marker = tmp_path / "died"
    m = build_index(corpus, tmp_path / "idx", embedder=create_embedder(clip_name), config=CONFIG,
                    engine=ray_engine(embedder_factory=DiesOnce(clip_name, str(marker))))
    assert marker.exists(), "an embedding worker process was killed"
    assert m.count == 24
    assert_same_index(local_build, CorpusIndex.open(tmp_path / "idx"))
