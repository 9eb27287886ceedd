"""`retrogen index build | info | import`: artefacts, --json, and one readable line + exit code 2 on bad input."""

import json
import sys

import pytest
from typer.testing import CliRunner

from retrogen import cli
from tests.conftest import colour_image, write_clip_retrieval_output

runner = CliRunner()


@pytest.fixture(scope="module")
def built(tmp_path_factory, mean_colour_embedder):
    root = tmp_path_factory.mktemp("cli")
    for i in range(6):
        colour_image((40 * i, 200 - 30 * i, 90), size=(12, 12), noise_seed=i).save(root / f"{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n nope")
    out = root / "index"
    res = runner.invoke(cli.app, ["index", "build", "--source", str(root), "--out", str(out), "--embedder",
                                  "meancolour", "--shard-size", "4", "--dtype", "float32", "--quiet"])
    assert res.exit_code == 0, res.output
    return root, out, res.output


def test_build_writes_the_index_and_reports_it(built):
    root, out, output = built
    assert "6 vectors (dim 16), Flat, exact, 1 skipped" in output
    for name in ("manifest.json", "image.index", "img_emb/img_emb_0000.npy", "img_emb/img_emb_0001.npy",
                 "metadata/metadata_0001.parquet"):
        assert (out / name).is_file(), name


def test_info_text_and_json(built):
    root, out, _ = built
    res = runner.invoke(cli.app, ["index", "info", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["count"] == 6 and info["dim"] == 16 and info["embedder"]["name"] == "meancolour"
    assert info["faiss"]["factory"] == "Flat" and info["recall"] is None
    assert info["skipped"]["count"] == 1 and info["skipped"]["files"][0]["path"].endswith("broken.png")
    assert info["sources"][0]["path"] == str(root) and info["build"]["parameters"]["shard_size"] == 4
    assert info["build"]["parameters"]["index_type"] == "auto" and info["build"]["parameters"]["dtype"] == "float32"
    text = runner.invoke(cli.app, ["index", "info", str(out)])
    assert text.exit_code == 0
    for needle in ("meancolour", "6 in 2 shard(s), float32", "Flat (flat)", "exact (flat index)", "skipped     1"):
        assert needle in text.output, needle


def test_import_command(tmp_path):
    src = tmp_path / "clip"
    write_clip_retrieval_output(src, 80)
    res = runner.invoke(cli.app, ["index", "import", "--from", str(src), "--out", str(tmp_path / "idx"),
                                  "--embedder", "hf:openai/clip-vit-base-patch32", "--index-type", "hnsw", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "80 vectors (dim 8), HNSW32,Flat, recall@10" in res.output
    info = json.loads(runner.invoke(cli.app, ["index", "info", str(tmp_path / "idx"), "--json"]).output)
    assert info["recall"]["recall_at_10"] > 0.9 and info["embedder"]["modalities"] == ["image", "text"]


@pytest.mark.parametrize("args, message", [
    (["index", "build", "--source", "{missing}", "--out", "{out}", "--embedder", "meancolour"], "does not exist"),
    (["index", "info", "{missing}"], "does not exist"),
    (["index", "build", "--source", "{src}", "--out", "{out}", "--embedder", "meancolour", "--index-type", "flat",
      "--memory-budget", "10"], "over the budget"),
    (["index", "build", "--source", "{src}", "--out", "{out}", "--embedder", "meancolour", "--dtype", "int8"],
     "dtype='int8'"),
    (["index", "build", "--source", "{src}", "--out", "{out}", "--embedder", "meancolour", "--work-dir", "{missing}"],
     "--work-dir needs a URL --out"),
])
def test_bad_input_is_one_line_and_exit_code_2(built, tmp_path, monkeypatch, capsys, args, message):
    root, _, _ = built
    argv = [a.format(missing=tmp_path / "missing", out=tmp_path / "o", src=root) for a in args]
    monkeypatch.setattr(sys, "argv", ["retrogen", *argv])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert not (tmp_path / "o").exists()
