"""The evidence benchmark (bench/evidence.py) end to end at toy size: real Fashion-MNIST, tiny models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from retrogen.fashion_mnist import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                                reason="Debian's dataset-fashion-mnist is not installed")


def test_evidence_toy_end_to_end(tmp_path, tiny_sd_dir, tiny_open_clip_dir, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import evidence

    arms = ["retrieval", "retrieval-diverse", "retrieval-caption", "prompt", "img2img", "textual-inversion",
            "dreambooth", "real-extra"]
    # The random tiny CLIP maps everything close together: only exact copies may count as duplicates here.
    rc = evidence.main(["--toy", "--workdir", str(tmp_path), "--model", str(tiny_sd_dir), "--arms", ",".join(arms),
                        "--embedder", f"open_clip:local-dir:{tiny_open_clip_dir}", "--leakage-threshold", "0.99999",
                        "--dedup-threshold", "0.99999"])
    assert rc == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "evidence.json").read_text())
    cells = {(c["tier"], c["classifier"], c["k"]): c["report"] for c in result["cells"]}
    assert set(cells) == {("A", "linear", 2), ("A", "cnn", 2), ("B", "linear", 2), ("B", "cnn", 2)}
    tier_a, tier_b = cells[("A", "linear", 2)], cells[("B", "linear", 2)]
    assert [a["name"] for a in tier_a["arms"]] == ["real-only", "retrieval", "retrieval-diverse", "retrieval-caption",
                                                   "prompt", "real-extra"]
    assert [a["name"] for a in tier_b["arms"]] == ["real-only", *arms]
    assert len(tier_b["draws"]) == 2 and all(d["train_per_class"] == {c: 2 for c in tier_b["classes"]}
                                             for d in tier_b["draws"])
    for arm in tier_b["arms"][1:]:
        shared = arm["name"] in ("prompt", "retrieval-caption")  # no shots: one set for every draw
        assert arm["gain"]["num_draws"] == 2 and len(arm["set_dirs"]) == (1 if shared else 2)
        if arm["name"] != "real-extra":  # generated/retrieved sets carry their cost; plain real images do not
            assert arm["cost"]["seconds_per_image"] > 0
    assert {(c["a"], c["b"]) for c in tier_b["comparisons"]} == {("retrieval", g) for g in arms[3:7]} | {
        ("retrieval-diverse", "retrieval"), ("retrieval-caption", "retrieval")}
    diverse = [json.loads(line) for line in
               (tmp_path / "sets" / "retrieval-diverse" / "k2-d0" / "provenance.jsonl").read_text().splitlines()]
    assert {r["selection"] for r in diverse} == {"diverse"}
    # caption matching from the class names alone: each item's caption names its class ("a photo of a bag")
    captioned = [json.loads(line) for line in
                 (tmp_path / "sets" / "retrieval-caption" / "provenance.jsonl").read_text().splitlines()]
    assert captioned and all(r["query"]["type"] == "caption" for r in captioned)
    assert all(r["label"].replace("_", " ") in r["caption"] for r in captioned)
    # each draw's sets were made from that draw's own shots, through `generation` with the model given
    prov = [json.loads(line) for line in
            (tmp_path / "sets" / "img2img" / "k2-d1" / "provenance.jsonl").read_text().splitlines()]
    shots_d1 = {p.name for p in (tmp_path / "data" / "draws" / "k2" / "d1" / "shots").rglob("*.png")}
    assert prov[0]["model"] == str(tiny_sd_dir) and {r["init_image"].split("/")[1] for r in prov} <= shots_d1
    for name in ("report.json", "report.md", "report.png"):
        assert (tmp_path / "report-B-linear-k2" / name).exists()
    assert "| linear | B (2) | 2 | img2img |" in out and "Burg et al." in out and "Not run: retrieval by text" in out
    md = (tmp_path / "evidence.md").read_text()
    assert "retrieval − it" in md and "retrieval-diverse − retrieval" in md and "retrieval-caption −" in md and (tmp_path / "evidence.png").exists()
    assert (tmp_path / "evidence-sets.png").stat().st_size > 0
