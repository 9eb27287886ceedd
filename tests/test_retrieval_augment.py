"""augment_by_retrieval end to end: real index build, real embedders (tiny open_clip, EfficientNet-Lite0)."""

import io
import json
import tarfile
import zlib

import numpy as np
import pytest
from typer.testing import CliRunner

from retrogen.cli import app
from retrogen.errors import InvalidInputError
from retrogen.fileio import sha256_bytes
from retrogen.outputs import OutputFolder
from retrogen.provenance import common_fields
from retrogen.retrieval.augment import augment_by_retrieval
from retrogen.retrieval.config import RetrievalConfig
from retrogen.retrieval.embedders import create_embedder
from retrogen.retrieval.errors import InvalidRetrievalConfigError
from retrogen.retrieval.index import CorpusIndex
from retrogen.retrieval.provenance import retrieved_item_fields
from tests.conftest import colour_image

# Three colour families; each corpus item is a noisy shade of one, so its class is known.
FAMILIES = {"red": (210, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 210)}
PER_FAMILY = 12
# Flat colour shades are near-duplicates of each other for a real CNN (cosine ~0.99), so the tests use
# thresholds that only catch exact copies; the demo test exercises the defaults on real data.
STRICT = RetrievalConfig(leakage_threshold=0.999, dedup_threshold=0.9999)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _shade(rgb, i):
    return tuple(int(np.clip(c + (i % 5 - 2) * 9, 0, 255)) for c in rgb)


@pytest.fixture(scope="module")
def corpus_tar(tmp_path_factory):
    """An img2dataset-style webdataset shard whose true class is in the key (hidden from retrieval)."""
    path = tmp_path_factory.mktemp("corpus") / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for fam, rgb in FAMILIES.items():
            for i in range(PER_FAMILY):
                key = f"{fam}-{i:03d}"
                files = {f"{key}.png": _png(colour_image(_shade(rgb, i), noise_seed=zlib.crc32(key.encode()) % 1000)),
                         f"{key}.txt": f"a {fam} thing".encode(),
                         f"{key}.json": json.dumps({"url": f"http://example.com/{key}.png", "license": "cc0"}).encode()}
                for name, data in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    for fam, rgb in FAMILIES.items():
        (root / fam).mkdir()
        for i in range(2):
            colour_image(_shade(rgb, i + 1), noise_seed=500 + i).save(root / fam / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def clip_index(tmp_path_factory, corpus_tar, tiny_open_clip_dir):
    from retrogen.index_builder.build import build_index

    out = tmp_path_factory.mktemp("idx_clip") / "index"
    build_index([str(corpus_tar)], out, embedder=create_embedder(f"open_clip:local-dir:{tiny_open_clip_dir}"))
    return out


@pytest.fixture(scope="module")
def effnet_index(tmp_path_factory, corpus_tar):
    from retrogen.index_builder.build import build_index

    out = tmp_path_factory.mktemp("idx_eff") / "index"
    build_index([str(corpus_tar)], out, embedder=create_embedder("efficientnet-lite0"))
    return out


def true_family(record):
    return record["sample_key"].split("-")[0]


def test_image_mode_returns_right_class_with_complete_provenance(effnet_index, dataset, tmp_path):
    events = []
    result = augment_by_retrieval(dataset, tmp_path / "out", corpus=effnet_index, per_class=5, mode="image",
                                  config=STRICT, progress=events.append)
    records = OutputFolder(tmp_path / "out").records()
    assert result.counts == {"blue": 5, "green": 5, "red": 5}
    # the real EfficientNet features put colour families together
    purity = np.mean([true_family(r) == r["label"] for r in records])
    assert purity >= 0.9, purity
    ids = [r["sample_id"] for r in records]
    assert len(ids) == len(set(ids)), "no corpus item is returned twice"
    for r in records:
        data = (tmp_path / "out" / r["file"]).read_bytes()
        assert r["sha256"] == sha256_bytes(data) == r["corpus_sha256"], "bytes exactly as stored in the corpus"
        for key in ("index_id", "index_version", "sample_id", "source_uri", "caption", "query", "similarity",
                    "rank", "filters_passed", "label", "method", "created", "retrogen_version"):
            assert key in r, key
        assert r["query"]["type"] == "image" and r["query"]["id"].startswith(r["label"] + "/")
        assert r["caption"] == f"a {true_family(r)} thing"
    # round-robin: both training images of every class contribute queries
    for fam in FAMILIES:
        assert {r["query"]["id"] for r in records if r["label"] == fam} == {f"{fam}/0.png", f"{fam}/1.png"}
    assert {e.stage for e in events} >= {"embed_dataset", "search", "write"}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["per_class"]["red"] == {"requested": 5, "returned": 5, "reason": None}
    assert summary["parameters"] == {"mode": "image", "per_class": 5, **STRICT.to_dict()}


def test_records_carry_the_shared_retrieved_item_fields(effnet_index, dataset, tmp_path):
    """Each record is the common fields + retrieved_item_fields (what /v1/retrieve returns too) + filters."""
    result = augment_by_retrieval(dataset, tmp_path / "out", corpus=effnet_index, per_class=2, config=STRICT)
    corpus = CorpusIndex.open(effnet_index)
    common = set(common_fields(label="x", method="m", image_bytes=b"", file="f"))
    for r in result.records:
        (meta,) = corpus.metadata([r["sample_id"]])
        expected = retrieved_item_fields(corpus, meta, sample_id=r["sample_id"], similarity=r["similarity"],
                                         rank=r["rank"], query=r["query"], embedder_name="efficientnet-lite0")
        assert {k: r[k] for k in expected} == expected
        assert set(r) == common | set(expected) | {"filters_passed", "mime_type", "selection"}
        assert r["selection"] == "knn"
        assert r["source_uri"] == f"{meta['source']}#{meta['member']}" and r["mime_type"] == "image/png"
        assert (r["width"], r["height"]) == (40, 32) and r["index_version"] == corpus.manifest.build["created"]
        assert r["filters_passed"] == ["duplicate", "conflict", "leakage", "near_duplicate"]


def test_diverse_selection_keeps_the_class_and_records_itself(effnet_index, dataset, tmp_path):
    """Through the real pipeline (its spreading is shown on vectors where the answer is known, in
    test_selection_diverse.py: these flat colour shades all sit at cosine ~0.99 for a real CNN)."""
    knn = augment_by_retrieval(dataset, tmp_path / "knn", corpus=effnet_index, per_class=5, config=STRICT)
    diverse_cfg = STRICT.replace(selection="diverse", diversity_pool=PER_FAMILY * 2)
    div = augment_by_retrieval(dataset, tmp_path / "div", corpus=effnet_index, per_class=5, config=diverse_cfg)
    assert div.counts == {"blue": 5, "green": 5, "red": 5}
    assert np.mean([true_family(r) == r["label"] for r in div.records]) >= 0.9, "no worse in label purity"
    for fam in FAMILIES:
        gains = [r["selection_gain"] for r in div.records if r["label"] == fam]
        assert gains[0] > 0 and all(a >= b for a, b in zip(gains, gains[1:], strict=False)), gains
    assert {r["selection"] for r in div.records} == {"diverse"}
    assert div.summary["parameters"]["selection"] == "diverse"
    timings = div.summary["timings"]
    assert timings["selection"] == "diverse" and timings["selection_s"] > 0 and timings["search_s"] > 0
    assert knn.summary["timings"]["selection_s"] == 0
    again = augment_by_retrieval(dataset, tmp_path / "div2", corpus=effnet_index, per_class=5, config=diverse_cfg)
    assert [r["sample_id"] for r in again.records] == [r["sample_id"] for r in div.records]
    with pytest.raises(InvalidRetrievalConfigError, match="selection"):
        RetrievalConfig(selection="nearest")
    with pytest.raises(InvalidRetrievalConfigError, match="diversity_pool"):
        RetrievalConfig(diversity_pool=10**6)


def test_opt_out_list_removes_items_by_url_hash_and_domain(effnet_index, dataset, tmp_path):
    corpus = CorpusIndex.open(effnet_index)
    first = augment_by_retrieval(dataset, tmp_path / "a", corpus=effnet_index, per_class=3, config=STRICT)
    url_item, hash_item = first.records[0], first.records[4]
    cfg = STRICT.replace(opt_out=(url_item["url"], hash_item["corpus_sha256"].upper()))
    again = augment_by_retrieval(dataset, tmp_path / "b", corpus=effnet_index, per_class=3, config=cfg)
    ids = {r["sample_id"] for r in again.records}
    assert url_item["sample_id"] not in ids and hash_item["sample_id"] not in ids
    assert again.counts == first.counts, "the next candidates take their places"
    assert again.summary["removed"]["opt_out"] >= 2
    assert again.records[0]["filters_passed"] == ["duplicate", "opt_out", "conflict", "leakage", "near_duplicate"]
    (meta,) = corpus.metadata([url_item["sample_id"]])
    assert meta["url"].startswith("http://example.com/")
    none = augment_by_retrieval(dataset, tmp_path / "c", corpus=effnet_index, per_class=3,
                                config=STRICT.replace(opt_out=("example.com",)))
    assert none.counts == {} or not any(none.counts.values())
    assert all(v["returned"] == 0 and v["reason"] for v in none.summary["per_class"].values())


def test_fewer_than_n_with_a_reason_when_the_corpus_runs_out(effnet_index, dataset, tmp_path):
    result = augment_by_retrieval(dataset, tmp_path / "out", corpus=effnet_index, per_class=30, mode="image",
                                  config=RetrievalConfig(dedup_threshold=None, leakage_threshold=None))
    total = sum(result.counts.values())
    assert total == 3 * PER_FAMILY, "every corpus item is used once, none twice"
    short = [c for c in result.summary["per_class"].values() if c["returned"] < 30]
    assert short and all(c["reason"] for c in short)


def test_leakage_filter_removes_user_images_planted_in_the_corpus(tmp_path, corpus_tar):
    from retrogen.index_builder.build import build_index

    # the user's training images are themselves in the corpus: retrieval must never hand them back
    root = tmp_path / "ds"
    with tarfile.open(corpus_tar) as tar:
        for fam in FAMILIES:
            (root / fam).mkdir(parents=True)
            (root / fam / "0.png").write_bytes(tar.extractfile(f"{fam}-000.png").read())
    index = tmp_path / "index"
    build_index([str(corpus_tar)], index, embedder=create_embedder("efficientnet-lite0"))
    result = augment_by_retrieval(root, tmp_path / "out", corpus=index, per_class=3,
                                  config=STRICT)
    keys = {r["sample_key"] for r in result.records}
    assert not keys & {f"{fam}-000" for fam in FAMILIES}
    assert result.summary["removed"]["leakage"] >= 3
    # with the leakage filter off each planted image comes back, its own nearest neighbour; the near-duplicate
    # filter is off too: it could drop the planted copy behind a near-identical shade that ranks first in float16
    off = augment_by_retrieval(root, tmp_path / "out2", corpus=index, per_class=3,
                               config=RetrievalConfig(leakage_threshold=None, dedup_threshold=None))
    got = {(r["label"], r["sample_key"], r["similarity"]) for r in off.records}
    assert {f"{fam}-000" for fam in FAMILIES} <= {k for _, k, _ in got}, (got, off.summary["removed"])


def test_text_mode_and_label_check_with_tiny_clip(clip_index, dataset, tmp_path):
    # a random-weight CLIP maps all these images close together: similarity filters off, the label check on
    off = RetrievalConfig(leakage_threshold=None, dedup_threshold=None)
    result = augment_by_retrieval(dataset, tmp_path / "t", corpus=clip_index, per_class=4, mode="text", config=off)
    assert all(r["query"]["type"] == "text" and r["label"] in r["query"]["prompt"] for r in result.records)
    assert sum(result.counts.values()) == 12
    mixed = augment_by_retrieval(dataset, tmp_path / "m", corpus=clip_index, per_class=4, mode="mixed", config=off)
    assert {r["query"]["type"] for r in mixed.records} == {"image", "text"}
    checked = augment_by_retrieval(dataset, tmp_path / "c", corpus=clip_index, per_class=4, mode="image",
                                   config=RetrievalConfig(label_check=True, leakage_threshold=None,
                                                          dedup_threshold=None))
    # with random weights, zero-shot predictions disagree with some labels: the check must have removed them,
    # and every survivor must be predicted as its own class
    assert checked.summary["removed"]["label_check"] > 0
    from retrogen.retrieval.prompts import class_prompts, class_text_embeddings

    embedder = create_embedder(CorpusIndex.open(clip_index).manifest.embedder["name"])
    classes = sorted(FAMILIES)
    text = class_text_embeddings(embedder, class_prompts(classes))
    vecs = CorpusIndex.open(clip_index).embeddings([r["sample_id"] for r in checked.records]).astype(np.float32)
    predicted = [classes[i] for i in (vecs @ text.T).argmax(axis=1)]
    assert predicted == [r["label"] for r in checked.records]


def test_embedder_mismatch_and_bad_input_are_refused(effnet_index, clip_index, dataset, tmp_path, tiny_open_clip_dir):
    from retrogen.retrieval.errors import EmbedderMismatchError

    with pytest.raises(EmbedderMismatchError, match="efficientnet-lite0"):
        augment_by_retrieval(dataset, tmp_path / "x", corpus=effnet_index, per_class=2,
                             embedder=create_embedder(f"open_clip:local-dir:{tiny_open_clip_dir}"))
    with pytest.raises(InvalidInputError, match="image-text embedder"):
        augment_by_retrieval(dataset, tmp_path / "x", corpus=effnet_index, per_class=2, mode="text")
    with pytest.raises(InvalidInputError, match="mode"):
        augment_by_retrieval(dataset, tmp_path / "x", corpus=effnet_index, per_class=2, mode="sideways")
    with pytest.raises(InvalidInputError, match="class folders"):
        augment_by_retrieval(tmp_path, tmp_path / "x", corpus=effnet_index, per_class=2)


def test_cli_retrieve_and_errors(effnet_index, dataset, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-out"
    res = runner.invoke(app, ["augment", "retrieve", "--index-dir", str(effnet_index), "--dataset", str(dataset),
                              "--per-class", "3", "--out", str(out), "--quiet",
                              "--leakage-threshold", "0.999", "--dedup-threshold", "0.9999"])
    assert res.exit_code == 0, res.output
    assert "Loaded pretrained" not in res.output, "third-party prints stay out of CLI output"
    assert "red: 3/3" in res.output and (out / "provenance.jsonl").exists()
    # a second run into the same folder is refused (nothing overwritten) unless --overwrite
    before = (out / "provenance.jsonl").read_bytes()
    again = runner.invoke(app, ["augment", "retrieve", "--index-dir", str(effnet_index), "--dataset", str(dataset),
                                "--per-class", "3", "--out", str(out), "--quiet"])
    assert again.exit_code != 0 and (out / "provenance.jsonl").read_bytes() == before
    # the settings' options come from RetrievalConfig, checked by it before any work
    bad = runner.invoke(app, ["augment", "retrieve", "--index-dir", str(effnet_index), "--dataset", str(dataset),
                              "--per-class", "3", "--out", str(tmp_path / "bad"), "--conflict", "sideways"])
    assert isinstance(bad.exception, InvalidRetrievalConfigError) and "conflict='sideways'" in str(bad.exception)
    assert not (tmp_path / "bad").exists()


def test_cli_one_readable_line_and_exit_code_on_bad_input(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "retrogen"
    proc = subprocess.run([str(exe), "augment", "retrieve", "--index-dir", str(tmp_path / "nope"), "--dataset",
                           str(tmp_path), "--per-class", "3", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr


def test_cli_out_rule_overwrite_clears_and_foreign_content_is_kept(effnet_index, dataset, tmp_path):
    from retrogen.outputs import OutputExistsError

    runner = CliRunner()
    out = tmp_path / "out"

    def retrieve(to, *extra):
        return runner.invoke(app, ["augment", "retrieve", "--index-dir", str(effnet_index), "--dataset", str(dataset),
                                   "--per-class", "2", "--out", str(to), "--quiet", "--leakage-threshold", "0.999",
                                   "--dedup-threshold", "0.9999", *extra])

    assert retrieve(out).exit_code == 0
    (out / "red" / "foreign.png").write_bytes((dataset / "red" / "0.png").read_bytes())
    res = retrieve(out, "--overwrite")
    assert res.exit_code == 0, res.output
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == {r["file"] for r in OutputFolder(out).records()} | {"provenance.jsonl", "summary.json"}
    # the user's dataset as --out: refused with or without --overwrite, before any embedding, and left as it was
    before = {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()}
    for extra in ([], ["--overwrite"]):
        bad = retrieve(dataset, *extra)
        assert isinstance(bad.exception, OutputExistsError) and "holds no augmentation output" in str(bad.exception)
    assert {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()} == before
    # an output of another command is not replaced either
    OutputFolder.create(tmp_path / "gen").close({"method": "prompt", "per_class": {}})
    other = retrieve(tmp_path / "gen", "--overwrite")
    assert isinstance(other.exception, OutputExistsError) and "output of another command" in str(other.exception)
    # --out naming a file: refused before --embedder loads a model (this one is not even cached)
    (tmp_path / "a-file").write_text("notes")
    res = retrieve(tmp_path / "a-file", "--embedder", "open_clip:ViT-B-32:not-cached")
    assert isinstance(res.exception, OutputExistsError) and "a-file is a file" in str(res.exception)


def test_unreadable_dataset_images_are_named_and_a_class_without_any_fails(effnet_index, dataset, tmp_path, caplog):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    (data / "green" / "9.png").write_bytes(b"")
    with caplog.at_level("WARNING"):
        result = augment_by_retrieval(data, tmp_path / "o1", corpus=effnet_index, per_class=1, config=STRICT)
    assert result.summary["skipped_dataset_images"] == [{"file": "green/9.png", "reason": "empty_file"}]
    assert f"{data / 'green' / '9.png'}: not a usable image (empty_file)" in caplog.text
    for f in (data / "blue").iterdir():
        f.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(InvalidInputError, match=r"class 'blue' has no readable image in .*: blue/0.png \(not_an_image\)"):
        augment_by_retrieval(data, tmp_path / "o2", corpus=effnet_index, per_class=1, config=STRICT)
    assert not (tmp_path / "o2").exists()
