"""Caption matching (an FTS5 index written at build time, the ``caption`` mode) and names-only retrieval
(``augment_from_names``, ``retrogen augment retrieve --classes``)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from retrogen.cli import app
from retrogen.errors import InvalidInputError
from retrogen.retrieval.augment import augment_by_retrieval, augment_from_names
from retrogen.retrieval.captions import class_names_for_captions, fts_query
from retrogen.retrieval.config import RetrievalConfig
from retrogen.retrieval.embedders import create_embedder
from retrogen.retrieval.index import CorpusIndex
from tests.conftest import colour_image

FAMILIES = {"red": (210, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 210)}
# captions name the family, a synonym, or nothing; their pixels always show the family
CAPTIONS = {"red": ["a photo of a red car", "Red cars parked", "scarlet dress", "crimson sunset", "a thing", None],
            "green": ["a photo of a green car", "Green cars parked", "emerald dress", "olive sunset", "a thing", None],
            "blue": ["a photo of a blue car", "Blue cars parked", "navy dress", "azure sunset", "a thing", None]}
LOOSE = RetrievalConfig(leakage_threshold=None, dedup_threshold=None)


@pytest.fixture(scope="module")
def listing(tmp_path_factory):
    root = tmp_path_factory.mktemp("cap")
    rows = []
    for fam, rgb in FAMILIES.items():
        for i, caption in enumerate(CAPTIONS[fam]):
            path = root / "img" / f"{fam}-{i}.png"
            path.parent.mkdir(exist_ok=True)
            colour_image(tuple(int(np.clip(c + i * 5, 0, 255)) for c in rgb), noise_seed=i).save(path)
            rows.append({"path": str(path), "key": f"{fam}-{i}", "caption": caption})
    pq.write_table(pa.Table.from_pylist(rows), root / "list.parquet")
    return root / "list.parquet"


@pytest.fixture(scope="module")
def pixel_index(tmp_path_factory, listing, mean_colour_embedder):
    from retrogen.index_builder.build import build_index
    from retrogen.index_builder.config import IndexBuildConfig

    out = tmp_path_factory.mktemp("cap_idx") / "index"
    build_index([str(listing)], out, embedder=mean_colour_embedder,
                config=IndexBuildConfig(index_type="flat", num_workers=1))
    return out


@pytest.fixture(scope="module")
def clip_index(tmp_path_factory, listing, tiny_open_clip_dir):
    from retrogen.index_builder.build import build_index
    from retrogen.index_builder.config import IndexBuildConfig

    out = tmp_path_factory.mktemp("cap_clip") / "index"
    build_index([str(listing)], out, embedder=create_embedder(f"open_clip:local-dir:{tiny_open_clip_dir}"),
                config=IndexBuildConfig(index_type="flat", num_workers=1))
    return out


def _records(out):
    return [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]


def test_names_become_quoted_phrases():
    assert class_names_for_captions("golden_retriever", {"golden_retriever": ["Golden Retriever", "goldie"]}) == \
        ["golden retriever", "goldie"]
    assert fts_query(['say "hi" OR x', "t-shirt"]) == '"say hi OR x" OR "t shirt"'
    assert fts_query(["--", "  "]) is None


def test_the_build_writes_a_caption_index_with_stemming(pixel_index):
    corpus = CorpusIndex.open(pixel_index)
    assert corpus.manifest.captions["rows"] == 15  # 18 items, 3 without a caption
    keys = {r["id"]: r["key"] for r in corpus.metadata(range(corpus.ntotal))}
    hits = [keys[i] for i, _ in corpus.search_captions(fts_query(["red car"]), 10)]
    assert sorted(hits) == ["red-0", "red-1"], "'Red cars' matches 'red car' (case and plural folded)"
    scores = [s for _, s in corpus.search_captions(fts_query(["car"]), 10)]
    assert len(scores) == 6 and scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)


def test_names_only_caption_mode_returns_items_whose_captions_name_the_class(pixel_index, tmp_path):
    config = LOOSE.replace(class_synonyms={"red": ["scarlet", "crimson"]})
    result = augment_from_names(["red", "green"], tmp_path / "out", corpus=pixel_index, per_class=4,
                                mode="caption", config=config)
    recs = _records(tmp_path / "out")
    red = sorted(r["sample_key"] for r in recs if r["label"] == "red")
    assert red == ["red-0", "red-1", "red-2", "red-3"], "the name and both synonyms match"
    green = sorted(r["sample_key"] for r in recs if r["label"] == "green")
    assert green == ["green-0", "green-1"] and result.summary["per_class"]["green"]["reason"]
    for r in recs:
        assert r["method"] == "retrieval:caption" and r["query"]["type"] == "caption" and r["query"]["bm25"] > 0
    assert result.summary["classes_from"] == "names"
    assert (tmp_path / "out" / "green").is_dir() and (tmp_path / "out" / "red").is_dir()


def test_caption_matches_are_reranked_by_the_class_text_embedding(clip_index, tmp_path):
    """With an image-text embedder, caption matches are ordered by cosine to the class's prompt ensemble."""
    from retrogen.retrieval.prompts import class_prompts, class_text_embeddings

    corpus = CorpusIndex.open(clip_index)
    embedder = create_embedder(corpus.manifest.embedder["name"])
    augment_from_names(["red"], tmp_path / "out", corpus=corpus, per_class=2, mode="caption",
                       config=LOOSE.replace(class_synonyms={"red": ["scarlet", "crimson"]}), embedder=embedder)
    got = [r["sample_id"] for r in _records(tmp_path / "out")]
    matched = [i for i, _ in corpus.search_captions(fts_query(["red", "scarlet", "crimson"]), 100)]
    ref = class_text_embeddings(embedder, class_prompts(["red"]))[0]
    sims = corpus.embeddings(matched).astype(np.float32) @ ref
    assert got == [matched[j] for j in np.argsort(-sims, kind="stable")[:2]]
    assert [r["similarity"] for r in _records(tmp_path / "out")] == pytest.approx(sorted(sims, reverse=True)[:2],
                                                                                   abs=1e-5)


def test_text_and_caption_mix_and_a_holdout_is_protected(clip_index, tmp_path):
    corpus = CorpusIndex.open(clip_index)
    hold = tmp_path / "hold" / "red"
    hold.mkdir(parents=True)
    colour_image(tuple(int(np.clip(c, 0, 255)) for c in FAMILIES["red"]), noise_seed=0).save(hold / "0.png")
    result = augment_from_names(["red", "blue"], tmp_path / "out", corpus=corpus, per_class=3, mode="text+caption",
                                holdout_dir=tmp_path / "hold",
                                config=RetrievalConfig(leakage_threshold=0.9999, dedup_threshold=None))
    recs = _records(tmp_path / "out")
    assert {r["query"]["type"] for r in recs} == {"text", "caption"}
    assert "red-0" not in {r["sample_key"] for r in recs}, "red-0 is the held-out image's twin"
    assert result.summary["removed"]["leakage"] >= 1 and result.summary["method"] == "retrieval:text+caption"


def test_image_and_caption_mix_from_a_dataset(pixel_index, tmp_path):
    ds = tmp_path / "ds" / "blue"
    ds.mkdir(parents=True)
    colour_image(tuple(c + 25 for c in FAMILIES["blue"]), noise_seed=77).save(ds / "0.png")  # nearest: blue-5
    augment_by_retrieval(tmp_path / "ds", tmp_path / "out", corpus=pixel_index, per_class=4, mode="image+caption",
                         config=LOOSE)
    recs = _records(tmp_path / "out")
    assert [r["query"]["type"] for r in recs] == ["image", "caption", "image", "caption"], "interleaved"
    assert all("blue" in r["caption"].lower() for r in recs if r["query"]["type"] == "caption")


def test_requests_an_index_or_embedder_cannot_serve_are_refused(pixel_index, tmp_path, mean_colour_embedder):
    from retrogen.index_builder.build import build_index
    from retrogen.index_builder.config import IndexBuildConfig

    cases = [({"mode": "image"}, "dataset's images"), ({"mode": "text"}, "image-text embedder"),
             ({"mode": "caption", "config": RetrievalConfig(selection="diverse")}, "diverse"),
             ({"mode": "caption", "config": RetrievalConfig(caption_rerank="image")}, "dataset's images"),
             ({"mode": "sideways"}, "mode must be")]
    for kwargs, words in cases:
        with pytest.raises(InvalidInputError, match=words):
            augment_from_names(["red"], tmp_path / "out", corpus=pixel_index, per_class=1, **kwargs)
    for classes, words in (([], "at least one"), (["a/b"], "folder name"), (["x", "x"], "unique")):
        with pytest.raises(InvalidInputError, match=words):
            augment_from_names(classes, tmp_path / "out", corpus=pixel_index, per_class=1, mode="caption")
    # an index of a corpus without captions has no caption index, and says how to add one
    (tmp_path / "imgs").mkdir()
    colour_image((200, 0, 0), noise_seed=1).save(tmp_path / "imgs" / "a.png")
    build_index([str(tmp_path / "imgs")], tmp_path / "bare", embedder=mean_colour_embedder,
                config=IndexBuildConfig(index_type="flat", num_workers=1))
    with pytest.raises(InvalidInputError, match="retrogen index captions"):
        augment_from_names(["red"], tmp_path / "out", corpus=tmp_path / "bare", per_class=1, mode="caption")
    assert not (tmp_path / "out").exists()


def test_index_captions_command_upgrades_an_older_index(pixel_index, tmp_path):
    import shutil

    from retrogen.retrieval.index_directory import IndexDirectory

    old = tmp_path / "old"
    shutil.copytree(pixel_index, old)
    directory = IndexDirectory(old)
    manifest = directory.read_manifest()
    manifest.captions, manifest.metadata = None, {}
    directory.write_manifest(manifest)
    (old / "captions.sqlite").unlink()
    assert CorpusIndex.open(old).manifest.captions is None
    r = CliRunner().invoke(app, ["index", "captions", str(old)])
    assert r.exit_code == 0, r.output
    assert "15 captions indexed" in r.output
    assert CorpusIndex.open(old).manifest.captions["rows"] == 15
    info = CliRunner().invoke(app, ["index", "info", str(old)])
    assert "15 in a full-text index" in info.output


def test_cli_names_only(pixel_index, tmp_path):
    r = CliRunner().invoke(app, ["augment", "retrieve", "--index-dir", str(pixel_index), "--classes", "red,green",
                                 "--classes", "blue", "--mode", "caption", "--per-class", "1", "--out",
                                 str(tmp_path / "out"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert sorted(r["label"] for r in _records(tmp_path / "out")) == ["blue", "green", "red"]
    r = CliRunner().invoke(app, ["augment", "retrieve", "--index-dir", str(pixel_index), "--per-class", "1",
                                 "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "exactly one of --dataset and" in r.output
