"""Image-text filtering of an augmentation output folder (applied where retrieval and generation meet)."""

import json

import numpy as np
import pytest

from retrogen.errors import InvalidInputError
from retrogen.outputs import OutputFolder
from retrogen.retrieval.embedders import create_embedder
from retrogen.retrieval.prompts import class_prompts, class_text_embeddings
from retrogen.retrieval.text_filter import filter_by_text_similarity
from tests.conftest import colour_image
from tests.test_foundation import encode


@pytest.fixture()
def output_folder(tmp_path):
    out = tmp_path / "gen"
    with OutputFolder.create(out) as w:
        for label in ("cat", "dog"):
            for i in range(4):
                w.add(label=label, filename=f"{i}.png", method="generation:prompt", fields={"seed": i},
                      image_bytes=encode(colour_image((40 * i, 200 - 40 * i, 90), noise_seed=i)))
        w.close({"method": "generation:prompt", "per_class": {c: {"requested": 4, "returned": 4, "reason": None}
                                                              for c in ("cat", "dog")}})
    return out


def test_filter_moves_low_similarity_images_and_rewrites_records(output_folder, tiny_open_clip_dir):
    emb = create_embedder(f"open_clip:local-dir:{tiny_open_clip_dir}")
    # compute the true similarities independently, then pick a threshold that splits them
    text = class_text_embeddings(emb, class_prompts(["cat", "dog"]))
    recs = OutputFolder(output_folder).records()
    from retrogen.imageio import decode_image

    vecs = emb.embed_images([decode_image((output_folder / r["file"]).read_bytes()) for r in recs])
    sims = np.array([v @ text[0 if r["label"] == "cat" else 1] for v, r in zip(vecs, recs, strict=True)])
    threshold = float(np.median(sims))
    report = filter_by_text_similarity(output_folder, emb, min_similarity=threshold)
    kept = OutputFolder(output_folder).records()
    expect_kept = {r["file"] for r, s in zip(recs, sims, strict=True) if s >= threshold}
    assert {r["file"] for r in kept} == expect_kept
    assert report["kept"] == len(expect_kept) and report["rejected"] == 8 - len(expect_kept)
    for r in kept:
        assert (output_folder / r["file"]).exists() and r["text_similarity"] >= threshold - 1e-6
    rejected = OutputFolder(output_folder / "rejected").records()
    assert all((output_folder / "rejected" / r["file"]).exists() for r in rejected)
    assert not any((output_folder / r["file"]).exists() for r in rejected)
    summary = json.loads((output_folder / "summary.json").read_text())
    assert sum(c["returned"] for c in summary["per_class"].values()) == len(kept)


def test_filter_refuses_image_only_embedders_and_unfinished_folders(output_folder, tmp_path, tiny_open_clip_dir):
    with pytest.raises(InvalidInputError, match="image-text"):
        filter_by_text_similarity(output_folder, create_embedder("efficientnet-lite0"), min_similarity=0.1)
    (tmp_path / "half").mkdir()
    clip = create_embedder(f"open_clip:local-dir:{tiny_open_clip_dir}")
    with pytest.raises(InvalidInputError, match="not a finished augmentation output"):
        filter_by_text_similarity(tmp_path / "half", clip, require_top1=True)
    with pytest.raises(InvalidInputError, match="min_similarity and/or require_top1"):
        filter_by_text_similarity(output_folder, clip)


def test_filter_names_an_unusable_image(output_folder, tiny_open_clip_dir):
    from retrogen.imageio import BadImageError

    (output_folder / "dog" / "2.png").write_bytes(b"")
    clip = create_embedder(f"open_clip:local-dir:{tiny_open_clip_dir}")
    with pytest.raises(BadImageError, match=f"^{output_folder / 'dog' / '2.png'}: not a usable image \\(empty_file\\)"):
        filter_by_text_similarity(output_folder, clip, require_top1=True)
