"""Screening corpus items: the corpus's opt-out flags and safety/watermark scores, the user's opt-out list,
and a pluggable unsafe-image classifier (``retrieval.safety``), through ``augment_by_retrieval``."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrogen.errors import InvalidInputError
from retrogen.retrieval.augment import augment_by_retrieval
from retrogen.retrieval.config import RetrievalConfig
from retrogen.retrieval.safety import ItemScreen, SafetyThresholds, load_classifier
from tests.conftest import colour_image

FAMILIES = {"red": (210, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 210)}
PER_FAMILY = 10
LOOSE = {"leakage_threshold": None, "dedup_threshold": None}


def _row(fam: str, i: int) -> dict:
    """Item i of a family: punsafe i/10, pwatermark (9-i)/10, NSFW on i=9, opted out on i=0, aesthetic i."""
    return {"caption": f"a {fam} thing", "url": f"https://{'bad.example' if i == 8 else 'ok.example'}/{fam}/{i}.png",
            "punsafe": i / 10, "pwatermark": (9 - i) / 10, "NSFW": "NSFW" if i == 9 else "UNLIKELY",
            "opt_out": i == 0, "aesthetic": float(i), "LICENSE": "cc-by", "status": "success"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, mean_colour_embedder):
    """A listing corpus (parquet of paths + LAION-style columns) indexed with the meancolour embedder."""
    from retrogen.index_builder.build import build_index
    from retrogen.index_builder.config import IndexBuildConfig

    root = tmp_path_factory.mktemp("screen")
    rows = []
    for fam, rgb in FAMILIES.items():
        for i in range(PER_FAMILY):
            path = root / "img" / f"{fam}-{i}.png"
            path.parent.mkdir(exist_ok=True)
            shade = tuple(int(np.clip(c + (i - 5) * 6, 0, 255)) for c in rgb)
            colour_image(shade, noise_seed=i).save(path)
            rows.append({"path": str(path), "key": f"{fam}-{i}", **_row(fam, i)})
    pq.write_table(pa.Table.from_pylist(rows), root / "list.parquet")
    build_index([str(root / "list.parquet")], root / "index", embedder=mean_colour_embedder,
                config=IndexBuildConfig(index_type="flat", num_workers=1))
    return root / "index"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    for fam, rgb in FAMILIES.items():
        (root / fam).mkdir()
        colour_image(rgb, noise_seed=99).save(root / fam / "0.png")
    return root


def _records(out):
    return [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]


def test_metadata_thresholds_and_flags_remove_items_and_are_recorded(corpus, dataset, tmp_path):
    config = RetrievalConfig(max_punsafe=0.5, max_pwatermark=0.6, nsfw_exclude=("nsfw",), **LOOSE)
    result = augment_by_retrieval(dataset, tmp_path / "out", corpus=corpus, per_class=4, config=config)
    recs = _records(tmp_path / "out")
    assert len(recs) == 9, "3 per family pass every threshold; the summary says why the 4th is missing"
    for r in recs:
        # the corpus's own fields travel into provenance; float32 scores read back as written
        assert r["punsafe"] <= 0.5 and r["pwatermark"] <= 0.6 and r["nsfw"] == "UNLIKELY" and r["opt_out"] is False
        assert r["licence"] == "cc-by" and r["status"] == "success"
        assert r["punsafe"] == round(r["punsafe"], 1)
        assert {"opt_out", "unsafe", "watermark"} <= set(r["filters_passed"])
    s = result.summary
    assert s["removed"]["unsafe"] > 0 and s["removed"]["watermark"] > 0 and s["removed"]["opt_out"] > 0
    assert s["screening"]["opt_out"]["items"] == {"corpus_flag": 3}, "distinct items; removed counts per class"
    assert s["screening"]["max_punsafe"] == 0.5 and s["screening"]["nsfw_exclude"] == ["NSFW"]
    # only items 3..5 of each family pass every threshold: punsafe <= 0.5, pwatermark <= 0.6
    assert sorted(int(r["sample_key"].split("-")[1]) for r in recs) == [3, 3, 3, 4, 4, 4, 5, 5, 5]


def test_a_threshold_is_exact_on_float32_scores(corpus, dataset, tmp_path):
    """punsafe 0.3 is stored as 0.30000001192...; max_punsafe=0.3 must keep it."""
    config = RetrievalConfig(max_punsafe=0.3, respect_corpus_opt_out=False, **LOOSE)
    augment_by_retrieval(dataset, tmp_path / "out", corpus=corpus, per_class=4, config=config)
    assert sorted({int(r["sample_key"].split("-")[1]) for r in _records(tmp_path / "out")}) == [0, 1, 2, 3]


def test_the_corpus_opt_out_flag_is_honoured_by_default_and_the_user_list_adds_to_it(corpus, dataset, tmp_path):
    plain = augment_by_retrieval(dataset, tmp_path / "a", corpus=corpus, per_class=PER_FAMILY,
                                 config=RetrievalConfig(**LOOSE))
    keys = {r["sample_key"] for r in _records(tmp_path / "a")}
    assert not any(k.endswith("-0") for k in keys) and len(keys) == 27
    assert plain.summary["screening"]["opt_out"]["items"] == {"corpus_flag": 3}
    listed = augment_by_retrieval(dataset, tmp_path / "b", corpus=corpus, per_class=PER_FAMILY,
                                  config=RetrievalConfig(opt_out=("BAD.example",), **LOOSE))
    keys = {r["sample_key"] for r in _records(tmp_path / "b")}
    assert not any(k.endswith(("-0", "-8")) for k in keys) and len(keys) == 24
    assert listed.summary["screening"]["opt_out"]["items"] == {"corpus_flag": 3, "user_list": 3}
    off = augment_by_retrieval(dataset, tmp_path / "c", corpus=corpus, per_class=PER_FAMILY,
                               config=RetrievalConfig(respect_corpus_opt_out=False, **LOOSE))
    assert len(_records(tmp_path / "c")) == 30 and off.summary["removed"]["opt_out"] == 0


def test_thresholds_on_scores_the_corpus_lacks_are_refused(tmp_path, dataset, mean_colour_embedder):
    from retrogen.index_builder.build import build_index
    from retrogen.index_builder.config import IndexBuildConfig

    colour_image((200, 0, 0), noise_seed=1).save(tmp_path / "a.png")
    build_index([str(tmp_path)], tmp_path / "index", embedder=mean_colour_embedder,
                config=IndexBuildConfig(index_type="flat", num_workers=1))
    for field in ("max_punsafe", "max_pwatermark"):
        with pytest.raises(InvalidInputError, match=field.replace("max_", "")):
            augment_by_retrieval(dataset, tmp_path / "out", corpus=tmp_path / "index", per_class=1,
                                 config=RetrievalConfig(**{field: 0.5}))
    assert not (tmp_path / "out").exists()


def test_a_pluggable_classifier_sees_decoded_images_and_removes_what_it_flags(corpus, dataset, tmp_path):
    config = RetrievalConfig(safety_classifier="tests.safety_fakes:reddish", safety_threshold=0.3,
                             respect_corpus_opt_out=False, **LOOSE)
    result = augment_by_retrieval(dataset, tmp_path / "out", corpus=corpus, per_class=PER_FAMILY, config=config)
    recs = _records(tmp_path / "out")
    assert {r["label"] for r in recs} == {"green", "blue"}, "every red item is flagged"
    assert all(0.0 <= r["safety_score"] < 0.3 for r in recs)
    assert result.summary["per_class"]["red"]["returned"] == 0 and result.summary["per_class"]["red"]["reason"]
    assert result.summary["screening"]["classified"] == 3 * PER_FAMILY
    assert result.summary["screening"]["classifier"] == "tests:reddish"


def test_classifier_specs_that_cannot_load_are_refused_with_one_line(mean_colour_embedder):
    for spec, words in (("nodots", "package.module:factory"), ("tests.safety_fakes:missing", "cannot be loaded"),
                        ("tests.safety_fakes:not_a_classifier", "must return"),
                        ("zero-shot:violence", "image-only")):
        with pytest.raises(InvalidInputError, match=words):
            load_classifier(spec, mean_colour_embedder)


def test_screen_counts_unscored_items_and_remembers_verdicts():
    rows = {1: {"id": 1, "url": None, "sha256": None, "punsafe": None},
            2: {"id": 2, "url": None, "sha256": None, "punsafe": 0.9}}
    calls = []

    def metadata(ids, cols):
        calls.append(list(ids))
        return [rows[i] for i in ids]

    screen = ItemScreen(SafetyThresholds(max_punsafe=0.5, respect_corpus_opt_out=False))
    kw = {"metadata": metadata, "embeddings": None, "images": None}
    assert screen.excluded([1, 2], **kw) == {2: "unsafe"}
    assert screen.excluded([2, 1], **kw) == {2: "unsafe"} and calls == [[1, 2]], "verdicts are remembered"
    assert screen.report()["unscored_candidates"] == {"punsafe": 1}


def test_the_diverse_quality_term_reads_the_corpus_aesthetic_score(corpus, dataset, tmp_path):
    """COBRA's optional quality term, wired to the corpus's aesthetic column: with a dominant weight the greedy
    takes the class's best-scored items first (aesthetic = item number here; red-0 is opted out)."""
    config = RetrievalConfig(selection="diverse", diversity_pool=PER_FAMILY, diversity_quality="aesthetic",
                             diversity_quality_weight=100.0, **LOOSE)
    augment_by_retrieval(dataset, tmp_path / "out", corpus=corpus, per_class=3, config=config)
    red = [r for r in _records(tmp_path / "out") if r["label"] == "red"]
    assert [r["sample_key"] for r in red] == ["red-9", "red-8", "red-7"]
    assert [r["selection_gain"] for r in red] == sorted((r["selection_gain"] for r in red), reverse=True)
    plain = RetrievalConfig(selection="diverse", diversity_pool=PER_FAMILY, **LOOSE)
    augment_by_retrieval(dataset, tmp_path / "plain", corpus=corpus, per_class=3, config=plain)
    assert [r["sample_key"] for r in _records(tmp_path / "plain") if r["label"] == "red"] != \
        ["red-9", "red-8", "red-7"], "without the term the order is coverage's"
