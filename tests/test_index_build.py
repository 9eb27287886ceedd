"""build_index end to end on tiny corpora: sources, bad files, resume, refusals, budgets, clip-retrieval import."""

import hashlib
import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from retrogen.imageio import decode_image
from retrogen.index_builder.build import build_index
from retrogen.index_builder.config import IndexBuildConfig, parse_memory
from retrogen.index_builder.errors import BuildMismatchError, IndexBuildError, MemoryBudgetError, SourceError
from retrogen.index_builder.faiss_build import plan_index
from retrogen.index_builder.importer import import_clip_retrieval
from retrogen.retrieval.errors import EmbedderMismatchError
from retrogen.retrieval.index import CorpusIndex
from retrogen.retrieval.index_directory import STATE_FILE


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def noise_image(seed: int, size=(16, 16)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3)
    arr = np.clip(base + rng.integers(-40, 41, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_bomb_header(width=100_000, height=100_000) -> bytes:
    """A valid PNG header claiming 10 gigapixels: must be refused before any pixel is allocated."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        sub = root / f"part{i % 3}" / "deeper"
        sub.mkdir(parents=True, exist_ok=True)
        noise_image(i).save(sub / f"img{i:02d}.png")
    odd = root / "odd"
    odd.mkdir()
    noise_image(100).convert("CMYK").save(odd / "cmyk.jpg")
    grey16 = Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 200)
    assert grey16.mode == "I;16"
    grey16.save(odd / "grey16.png")
    noise_image(101).convert("P", palette=Image.ADAPTIVE, colors=8).save(odd / "palette.png")
    bad = root / "bad"
    bad.mkdir()
    full = encode(noise_image(102, (64, 64)), "JPEG")
    (bad / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (bad / "text.jpg").write_text("this is not an image\n")
    (bad / "bomb.png").write_bytes(png_bomb_header())
    (root / "notes.txt").write_text("ignored: not an image name")
    return root


def test_folder_source_skips_bad_files_and_accepts_odd_modes(image_folder, tmp_path, mean_colour_embedder):
    events = []
    m = build_index([str(image_folder)], tmp_path / "idx", embedder=mean_colour_embedder,
                    config=IndexBuildConfig(shard_size=5, batch_size=4), progress=events.append)
    assert m.count == 15 and m.dtype == "float16" and m.embedder["name"] == "meancolour"
    reasons = {f["path"].rsplit("/", 1)[-1]: f["reason"] for f in m.skipped["files"]}
    assert m.skipped["count"] == 3
    assert reasons["bomb.png"] == "too_many_pixels" and reasons["text.jpg"] == "not_an_image"
    assert reasons["truncated.jpg"] in ("corrupt_image", "not_an_image")
    assert m.sources == [{"path": str(image_folder), "kind": "folder", "records": 18}]
    assert not (tmp_path / "idx" / STATE_FILE).exists()
    assert {e.stage for e in events} >= {"scan", "embed", "faiss_add"}
    assert events[-1].stage != "embed" and max(e.done for e in events if e.stage == "embed") == 18

    corpus = CorpusIndex.open(tmp_path / "idx")
    meta = corpus.metadata(range(corpus.ntotal))
    keys = [r["key"] for r in meta]
    assert {"odd/cmyk", "odd/grey16", "odd/palette"} <= set(keys)
    assert keys == sorted(keys), "deterministic (sorted) folder order"
    # stored vectors are the embedder's, bytes are exactly the files', sha256 recorded
    for r in meta:
        data = (image_folder / (r["key"] + r["source"][r["source"].rfind("."):])).read_bytes()
        assert corpus.read_bytes(r["id"]) == data and r["sha256"] == sha(data) and r["size"] == len(data)
        assert (r["width"], r["height"]) == decode_image(data).size
    direct = mean_colour_embedder.embed_images([decode_image(corpus.read_bytes(i)) for i in range(15)])
    np.testing.assert_allclose(corpus.embeddings(range(15)).astype(np.float32), direct, atol=2e-3)
    _, ids = corpus.search(direct[:3], 1)
    assert ids[:, 0].tolist() == [0, 1, 2]


@pytest.fixture(scope="module")
def wds_tar(tmp_path_factory):
    """An img2dataset-style shard: key.{jpg,png,webp} + key.txt + key.json, and one key without an image."""
    path = tmp_path_factory.mktemp("wds") / "00000.tar"
    images = {}
    with tarfile.open(path, "w") as tar:
        for i in range(9):
            key = f"{i:09d}"
            fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
            images[key] = encode(noise_image(200 + i), fmt)
            meta = {"url": f"http://example.com/{key}.{ext}", "license": "cc-by" if i % 2 else None, "key": key}
            for name, data in ((f"{key}.{ext}", images[key]), (f"{key}.txt", f"caption {i}".encode()),
                               (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("999999999.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    return path, images


def test_webdataset_tar_with_captions_and_json(wds_tar, tmp_path, mean_colour_embedder):
    path, images = wds_tar
    m = build_index([str(path)], tmp_path / "idx", embedder=mean_colour_embedder,
                    config=IndexBuildConfig(shard_size=4))
    assert m.count == 9 and m.skipped["count"] == 0 and len(m.shards) == 3
    corpus = CorpusIndex.open(tmp_path / "idx")
    rows = corpus.metadata(range(9))
    assert [r["key"] for r in rows] == sorted(images)
    for i, r in enumerate(rows):
        assert r["caption"] == f"caption {i}" and r["url"].startswith("http://example.com/")
        assert r["licence"] == ("cc-by" if i % 2 else None)
        assert r["source"] == str(path) and r["member"].startswith(r["key"])
        data = corpus.read_bytes(r["id"])
        assert data == images[r["key"]] and sha(data) == r["sha256"]
        with open(path, "rb") as f:  # the recorded offset is where the member's data starts in the tar
            f.seek(r["offset"])
            assert f.read(r["size"]) == data


def test_parquet_and_csv_listings_in_one_build(image_folder, wds_tar, tmp_path, mean_colour_embedder):
    files = sorted((image_folder / "part0").rglob("*.png"))
    listing_dir = tmp_path / "lists"
    listing_dir.mkdir()
    rel = [str(p.relative_to(image_folder)) for p in files]
    # relative paths resolve against the listing's own folder
    pq.write_table(pa.table({"path": [f"{image_folder.name}/{r}" for r in rel], "caption": [f"cap {r}" for r in rel],
                             "url": ["http://x/" + r for r in rel], "license": ["cc0"] * len(rel)}),
                   image_folder.parent / "list.parquet")
    csv = listing_dir / "list.csv"
    csv.write_text("image_path,caption\n" + "".join(f"{p},csv {p.name}\n" for p in files[:2])
                   + f"{tmp_path / 'missing.png'},gone\n")
    m = build_index([str(image_folder.parent / "list.parquet"), str(csv), str(wds_tar[0])], tmp_path / "idx",
                    embedder=mean_colour_embedder, config=IndexBuildConfig(dtype="float32"))
    assert [s["kind"] for s in m.sources] == ["listing", "listing", "webdataset"]
    assert [s["records"] for s in m.sources] == [len(files), 3, 9]
    assert m.count == len(files) + 2 + 9 and m.skipped["by_reason"] == {"unreadable": 1}
    corpus = CorpusIndex.open(tmp_path / "idx")
    rows = corpus.metadata(range(m.count))
    assert [r["caption"] for r in rows[: len(files)]] == [f"cap {r}" for r in rel]
    assert rows[0]["licence"] == "cc0" and rows[0]["url"] == "http://x/" + rel[0]
    assert [r["caption"] for r in rows[len(files): len(files) + 2]] == [f"csv {p.name}" for p in files[:2]]
    assert rows[len(files)]["source"] == str(files[0]) and rows[-1]["member"] is not None
    assert corpus.read_bytes(0) == files[0].read_bytes()


class Crash(Exception):
    pass


def test_interrupted_build_resumes_to_the_same_index(image_folder, tmp_path, mean_colour_embedder):
    kwargs = dict(embedder=mean_colour_embedder, config=IndexBuildConfig(shard_size=4, batch_size=2))
    full = build_index([str(image_folder)], tmp_path / "full", **kwargs)

    def crash_midway(event):
        if event.stage == "embed" and event.done >= 10:
            raise Crash("simulated crash")

    with pytest.raises(Crash):
        build_index([str(image_folder)], tmp_path / "resumed", progress=crash_midway, **kwargs)
    partial = tmp_path / "resumed"
    assert not (partial / "manifest.json").exists() and (partial / STATE_FILE).exists()
    assert len(list((partial / "metadata").glob("*.parquet"))) == 2  # shards 0 and 1 complete, shard 2 was cut
    (partial / "img_emb" / "img_emb_0002.npy").write_bytes(b"half a shard")  # e.g. killed mid-write

    events = []
    resumed = build_index([str(image_folder)], partial, progress=events.append, **kwargs)
    first_embed = min(e.done for e in events if e.stage == "embed")
    assert first_embed > 8, "completed shards are not embedded again"
    assert resumed.build["resumed_from_shard"] == 2
    a, b = CorpusIndex.open(tmp_path / "full"), CorpusIndex.open(partial)
    assert a.ntotal == b.ntotal == 15 and a.manifest.skipped == b.manifest.skipped
    assert a.manifest.index_id.split("-")[-1] == b.manifest.index_id.split("-")[-1]
    np.testing.assert_array_equal(a.embeddings(range(15)), b.embeddings(range(15)))
    assert a.metadata(range(15)) == b.metadata(range(15))
    q = a.embeddings(range(15)).astype(np.float32)
    for x, y in zip(a.search(q, 5), b.search(q, 5), strict=True):
        np.testing.assert_array_equal(x, y)
    assert (tmp_path / "full" / "image.index").read_bytes() == (partial / "image.index").read_bytes()
    assert full.count == resumed.count


def test_rerun_with_other_arguments_is_refused_unless_overwrite(image_folder, tmp_path, mean_colour_embedder):
    out = tmp_path / "idx"
    build_index([str(image_folder)], out, embedder=mean_colour_embedder)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(BuildMismatchError, match="differs in: dtype.*--overwrite"):
        build_index([str(image_folder)], out, embedder=mean_colour_embedder, config=IndexBuildConfig(dtype="float32"))
    assert (out / "manifest.json").read_bytes() == before
    events = []  # batch size and workers change a build's speed, not its output: still the same build
    again = build_index([str(image_folder)], out, embedder=mean_colour_embedder, progress=events.append,
                        config=IndexBuildConfig(batch_size=7, num_workers=1))
    assert not [e for e in events if e.stage == "embed"] and (out / "manifest.json").read_bytes() == before
    assert again.count == 15
    # an index recorded before an option existed is the same build when the option is at what it then did
    recorded = json.loads((out / "manifest.json").read_text())
    assert recorded["build"]["parameters"].pop("faiss_storage") == "memory"
    (out / "manifest.json").write_text(json.dumps(recorded))
    older = (out / "manifest.json").read_bytes()
    build_index([str(image_folder)], out, embedder=mean_colour_embedder)
    assert (out / "manifest.json").read_bytes() == older
    with pytest.raises(BuildMismatchError, match="differs in: faiss_storage"):
        build_index([str(image_folder)], out, embedder=mean_colour_embedder,
                    config=IndexBuildConfig(faiss_storage="ondisk", index_type="IVF2,Flat"))
    m = build_index([str(image_folder)], out, embedder=mean_colour_embedder, config=IndexBuildConfig(dtype="float32"),
                    overwrite=True)
    assert m.dtype == "float32" and CorpusIndex.open(out).embeddings([0]).dtype == np.float32
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(BuildMismatchError, match="not empty"):
        build_index([str(image_folder)], foreign, embedder=mean_colour_embedder)
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_memory_budget_and_index_choice_are_checked_before_work(image_folder, tmp_path, mean_colour_embedder):
    with pytest.raises(MemoryBudgetError, match="over the budget"):
        build_index([str(image_folder)], tmp_path / "idx", embedder=mean_colour_embedder,
                    config=IndexBuildConfig(index_type="flat", memory_budget="100"))
    assert not (tmp_path / "idx").exists()
    with pytest.raises(SourceError, match="does not exist"):
        build_index([str(tmp_path / "nope")], tmp_path / "idx", embedder=mean_colour_embedder)
    assert parse_memory("4G") == 4 * 1024 ** 3 and parse_memory("512M") == 512 * 1024 ** 2
    for bad, field in (({"memory_budget": "lots"}, "memory_budget"), ({"dtype": "int8"}, "dtype"),
                       ({"shard_size": 0}, "shard_size"), ({"index": "flat"}, "unknown index build setting")):
        with pytest.raises(IndexBuildError, match=field):
            IndexBuildConfig(**bad)
    assert plan_index(50_000, 512).kind == "flat"
    assert plan_index(500_000, 512).kind == "hnsw"
    big = plan_index(5_000_000, 512)
    # faiss's own refine re-ranks IVF-PQ from a float16 copy; tighter budgets get SQ8, then the shards' re-rank
    assert big.kind == "ivfpq" and big.factory.endswith("PQ64np,Refine(SQfp16)") and big.rerank_k_factor > 1
    assert big.memory_bytes > 5_000_000 * 512 * 2
    for budget, factory in (("700M", "Refine(SQfp16)"), ("400M", "Refine(SQ8)"), ("200M", "PQ64np")):
        plan = plan_index(500_000, 512, memory_budget=budget)  # HNSW would need ~1.1G
        assert plan.kind == "ivfpq" and plan.factory.endswith(factory), (budget, plan.factory)
        assert plan.memory_bytes <= parse_memory(budget)
    with pytest.raises(MemoryBudgetError):
        plan_index(5_000_000, 512, memory_budget="1M")
    with pytest.raises(Exception, match="valid FAISS factory"):
        plan_index(1000, 16, index_type="NotAnIndex")
    assert plan_index(1000, 16, index_type="IVF16,PQ4np").search_defaults == {"nprobe": 4}


def test_clip_retrieval_import_without_reembedding(tmp_path):
    src = tmp_path / "clip"
    (src / "img_emb").mkdir(parents=True)
    (src / "metadata").mkdir()
    rng = np.random.default_rng(3)
    raw = []
    for n, rows in enumerate((70, 50)):
        x = (rng.standard_normal((rows, 16)) * 3).astype(np.float16)  # not normalised: the importer must fix it
        raw.append(x)
        np.save(src / "img_emb" / f"img_emb_{n}.npy", x)
        pq.write_table(pa.table({
            "image_path": [f"/data/{n}/{i}.jpg" for i in range(rows)], "caption": [f"c{n}-{i}" for i in range(rows)],
            "url": [f"http://u/{n}/{i}" for i in range(rows)], "LICENSE": ["cc0"] * rows,
            "key": [f"{n}{i:04d}" for i in range(rows)], "width": [64] * rows, "height": [48] * rows,
            "status": ["success"] * rows, "punsafe": [i / 100 for i in range(rows)],
            "NSFW": ["UNLIKELY"] * (rows - 1) + ["NSFW"]}), src / "metadata" / f"metadata_{n}.parquet")
    m = import_clip_retrieval(src, tmp_path / "idx", embedder="open_clip:ViT-B-32:openai")
    assert m.count == 120 and m.dtype == "float16" and m.embedder["name"] == "open_clip:ViT-B-32:openai"
    assert m.build["renormalised"] == 120 and m.faiss["kind"] == "flat"
    corpus = CorpusIndex.open(tmp_path / "idx")
    expected = np.concatenate(raw).astype(np.float32)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(corpus.embeddings(range(120)).astype(np.float32), expected, atol=2e-3)
    row = corpus.metadata([75])[0]
    assert row == {"id": 75, "key": "10005", "source": "/data/1/5.jpg", "member": None, "offset": None,
                   "size": None, "caption": "c1-5", "url": "http://u/1/5", "licence": "cc0", "width": 64,
                   "height": 48, "sha256": None, "punsafe": pytest.approx(0.05), "pwatermark": None,
                   "nsfw": "UNLIKELY", "status": "success", "opt_out": None, "aesthetic": None}
    # LAION's optional columns are counted in the manifest; the captions are searchable
    assert m.metadata["non_null"] == {"punsafe": 120, "pwatermark": 0, "nsfw": 120, "status": 120, "opt_out": 0,
                                      "aesthetic": 0}
    assert m.captions["rows"] == 120
    assert [i for i, _ in corpus.search_captions('"c1 5"', 10)] == [75]
    q = expected[:4]
    _, ids = corpus.search(q, 5)
    np.testing.assert_array_equal(ids, np.argsort(-(q @ corpus.embeddings(range(120)).astype(np.float32).T),
                                                  axis=1, kind="stable")[:, :5])
    with pytest.raises(EmbedderMismatchError):
        corpus.check_embedder("efficientnet-lite0")
    (src / "metadata" / "metadata_1.parquet").unlink()
    with pytest.raises(SourceError, match="do not pair up"):
        import_clip_retrieval(src, tmp_path / "idx2")


def test_real_efficientnet_lite0_on_ten_images(tmp_path):
    from retrogen.retrieval.embedders import create_embedder

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(10):
        noise_image(300 + i, (48, 48)).save(folder / f"{i}.jpg", quality=95)
    emb = create_embedder("efficientnet-lite0")
    m = build_index([str(folder)], tmp_path / "idx", embedder=emb, config=IndexBuildConfig(batch_size=5))
    assert m.count == 10 and m.dim == 1280 and m.build["images_per_s"] > 0
    corpus = CorpusIndex.open(tmp_path / "idx")
    corpus.check_embedder(emb.name)
    q = emb.embed_images([decode_image((folder / f"{i}.jpg").read_bytes()) for i in (3, 7)])
    scores, ids = corpus.search(q, 3)
    assert ids[:, 0].tolist() == [3, 7] and (scores[:, 0] > 0.99).all()


def test_threaded_decoding_leaves_warning_filters_alone(tmp_path, mean_colour_embedder):
    """Parallel decoders must not change the process-wide warning filters (an earlier decode_image used
    warnings.catch_warnings, which is not thread-safe, and left "error" installed: a later library warning
    then raised)."""
    import warnings

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(200):
        noise_image(i, (64, 64)).save(folder / f"{i:03d}.jpg")
    before = list(warnings.filters)
    for run in range(2):
        build_index([str(folder)], tmp_path / f"idx{run}", embedder=mean_colour_embedder,
                    config=IndexBuildConfig(num_workers=4, batch_size=8))
        assert warnings.filters == before
