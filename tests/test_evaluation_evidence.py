"""The evidence benchmark (bench/evidence.py) end to end at toy size: real Fashion-MNIST, tiny models.

Uses the tests' tiny random SD and tiny open_clip (no weights from outside), 2 shots and 2 extra images per
class, 2 sampling/training steps. The retrieval arm runs when the index builder is installed.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from retrogen.fashion_mnist import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
                                reason="Debian's dataset-fashion-mnist is not installed")


def _has_index_builder() -> bool:
    return importlib.util.find_spec("retrogen.index_builder.build") is not None and \
        importlib.util.find_spec("retrogen.retrieval.index") is not None


def test_evidence_toy_end_to_end(tmp_path, tiny_sd_dir, tiny_open_clip_dir, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import evidence

    arms = ["prompt", "img2img", "textual-inversion", "dreambooth", "real-extra"]
    if _has_index_builder():
        arms.insert(0, "retrieval")
    # The random tiny CLIP maps everything close together, so only exact copies count as leaks here.
    rc = evidence.main(["--toy", "--workdir", str(tmp_path), "--model", str(tiny_sd_dir), "--arms", ",".join(arms),
                        "--embedder", f"open_clip:local-dir:{tiny_open_clip_dir}", "--leakage-threshold", "0.99999",
                        "--dedup-threshold", "0.99999"])
    assert rc == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "evidence.json").read_text())
    report = result["results"][0]["report"]
    assert [a["name"] for a in report["arms"]] == ["real-only", *arms]
    assert report["counts"]["train"] == {c: 2 for c in report["classes"]} and len(report["classes"]) == 10
    for arm in report["arms"][1:]:
        assert arm["num_images"] == 20 - result["results"][0]["set_aside"].get(arm["name"], 0) or \
            (arm["name"] == "retrieval" and arm["num_images"] > 0)  # filters may leave a class short
        assert len(arm["accuracy"]["per_seed"]) == 2
        if arm["name"] != "real-extra":  # generated/retrieved sets carry their cost; plain real images do not
            assert arm["cost"]["seconds_per_image"] > 0
    # Generated sets were made through `generation` with the model given, with provenance per image.
    prov = (tmp_path / "sets" / "img2img-k2" / "provenance.jsonl").read_text().splitlines()
    assert len(prov) == 20 and json.loads(prov[0])["model"] == str(tiny_sd_dir)
    for name in ("report.json", "report.md", "report.png"):
        assert (tmp_path / "report-k2" / name).exists()
    assert "| 2 | img2img |" in out and "Burg et al." in out
    assert (tmp_path / "evidence.md").read_text().count("\n| 2 |") == len(arms) + 1
