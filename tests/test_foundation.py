"""The foundation package: safe decoding, ImageFolder reading, output folders, the OpenMP guard, the CLI root."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from retrogen.imagefolder import DatasetLayoutError, scan_imagefolder
from retrogen.imageio import BadImageError, decode_image, probe_image
from retrogen.outputs import OutputFolder


def encode(im, fmt="PNG", **kw):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_every_common_mode_decodes_to_rgb(mode):
    arr = (np.arange(24 * 16).reshape(16, 24) % 251).astype(np.uint8)
    im = Image.fromarray(arr, "L").convert(mode) if mode != "I;16" else Image.fromarray(arr.astype(np.uint16) * 256)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    out = decode_image(encode(im, fmt))
    assert out.mode == "RGB" and out.size == (24, 16)
    if mode == "I;16":  # 16-bit is scaled, not clipped to white
        assert np.asarray(out).max() == 255 and np.asarray(out).min() < 50


def test_truncated_file_is_rejected():
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    probe_image(data[: len(data) // 2])  # the header is intact: only a full decode finds the damage
    with pytest.raises(BadImageError) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.reason == "corrupt_image"


def test_decompression_bomb_is_rejected_before_decoding():
    # a real PNG header claiming 30000 x 30000 pixels: refused from the header alone
    data = encode(Image.new("L", (30000, 30000)), "PNG", optimize=False)
    with pytest.raises(BadImageError) as e:
        probe_image(data, max_pixels=10_000_000)
    assert e.value.reason == "too_many_pixels"
    with pytest.raises(BadImageError):
        decode_image(data, max_pixels=10_000_000)


@pytest.mark.parametrize("data, reason", [(b"", "empty_file"), (b"hello, I am text", "not_an_image")])
def test_non_images(data, reason):
    with pytest.raises(BadImageError) as e:
        decode_image(data)
    assert e.value.reason == reason


def test_oversized_file_is_rejected():
    with pytest.raises(BadImageError, match="file_too_large"):
        decode_image(b"x" * 101, max_bytes=100)


def test_scan_imagefolder_layout_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="not found"):
        scan_imagefolder(tmp_path / "missing")
    with pytest.raises(DatasetLayoutError, match="no class folders"):
        scan_imagefolder(tmp_path)
    (tmp_path / "loose.png").write_bytes(b"x")
    with pytest.raises(DatasetLayoutError, match="top level"):
        scan_imagefolder(tmp_path)
    (tmp_path / "loose.png").unlink()
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "cat" / "a.jpg").write_bytes(b"x")
    (tmp_path / "cat" / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / "cat" / "notes.txt").write_bytes(b"x")
    with pytest.raises(DatasetLayoutError, match="'dog' has 0 images"):
        scan_imagefolder(tmp_path)
    (tmp_path / "dog" / "b.png").write_bytes(b"x")
    items = scan_imagefolder(tmp_path)
    assert [(i.label, i.path.name) for i in items] == [("cat", "a.jpg"), ("dog", "b.png")]
    assert items[0].image_id == "cat/a.jpg"


def test_output_writer_summary_last_and_refuses_to_clobber(tmp_path):
    out = tmp_path / "out"
    with OutputFolder.create(out) as w:
        w.add(label="cat", filename="1.png", image_bytes=b"abc", method="m", fields={"seed": 1})
        assert not (out / "summary.json").exists()
        w.close({"per_class": {"cat": {"requested": 1, "returned": 1, "reason": None}}})
    rec = OutputFolder(out).records()
    assert rec[0]["file"] == "cat/1.png" and rec[0]["seed"] == 1
    assert rec[0]["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")
    assert json.loads((out / "summary.json").read_text())["per_class"]["cat"]["returned"] == 1
    with pytest.raises(FileExistsError):
        OutputFolder.create(out)
    assert OutputFolder(out).records() == rec, "a refused writer leaves the existing output intact"
    with pytest.raises(DatasetLayoutError):
        OutputFolder.create(tmp_path / "o2").add(label="../x", filename="1.png", image_bytes=b"a", method="m", fields={})


def _finished_output(out, method="m"):
    with OutputFolder.create(out) as w:
        w.add(label="cat", filename="1.png", image_bytes=b"abc", method=method, fields={})
        w.close({"method": method, "per_class": {"cat": {"requested": 1, "returned": 1, "reason": None}}})
    return out


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_output_path_rule_is_one_for_every_writer(tmp_path):
    """New or empty: fine; a file or foreign content: never; an earlier output of the same command: with overwrite."""
    from retrogen.errors import InvalidInputError
    from retrogen.outputs import OutputExistsError

    assert issubclass(OutputExistsError, InvalidInputError) and OutputExistsError.exit_code == 2
    OutputFolder.check_writable(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    OutputFolder.check_writable(tmp_path / "empty", methods=["m"])
    (tmp_path / "a-file").write_bytes(b"x")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="a-file is a file"):
            OutputFolder.create(tmp_path / "a-file", overwrite=overwrite)

    # the user's own images (no provenance): refused, and overwrite does not delete them either
    foreign = tmp_path / "foreign"
    (foreign / "cat").mkdir(parents=True)
    (foreign / "cat" / "mine.png").write_bytes(b"user image")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="not empty \\(cat\\) and holds no augmentation output"):
            OutputFolder.create(foreign, overwrite=overwrite)
    assert _files(foreign) == {"cat/mine.png": b"user image"}

    # a finished output of the same command: refused, or with overwrite cleared (not merged into)
    out = _finished_output(tmp_path / "out")
    (out / "cat" / "foreign.png").write_bytes(b"not ours")
    (out / "dog").mkdir()
    with pytest.raises(OutputExistsError, match="already holds an augmentation output"):
        OutputFolder.check_writable(out, methods=["m"])
    with pytest.raises(OutputExistsError, match="output of another command \\(method m\\)"):
        OutputFolder.create(out, overwrite=True, methods=["retrieval:image"])
    with OutputFolder.create(out, overwrite=True, methods=["m", "n"]) as w:
        assert sorted(p.name for p in out.iterdir()) == ["provenance.jsonl"]  # cleared before the first image
        w.add(label="fox", filename="2.png", image_bytes=b"new", method="n", fields={})
        w.close({"method": "n", "per_class": {"fox": {"requested": 1, "returned": 1, "reason": None}}})
    assert set(_files(out)) == {"fox/2.png", "provenance.jsonl", "summary.json"}
    assert [r["file"] for r in OutputFolder(out).records()] == ["fox/2.png"]

    # an interrupted output (records, no summary) is replaced only with overwrite, as a finished one is
    (out / "summary.json").unlink()
    with pytest.raises(OutputExistsError, match="interrupted augmentation output"):
        OutputFolder.create(out, methods=["n"])
    OutputFolder.create(out, overwrite=True, methods=["n"]).close({"per_class": {}})
    assert set(_files(out)) == {"provenance.jsonl", "summary.json"}

    # files loose beside the ImageFolder are not part of it (the service's evaluation job writes its report first)
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text("{}")
    OutputFolder.create(report).close({"per_class": {}})
    assert set(_files(report)) == {"report.json", "provenance.jsonl", "summary.json"}


def test_bad_image_files_are_named(tmp_path):
    from retrogen.imageio import read_image_file

    (tmp_path / "cat").mkdir()
    empty, broken = tmp_path / "cat" / "3.png", tmp_path / "cat" / "4.png"
    empty.write_bytes(b"")
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(BadImageError) as e:
        read_image_file(empty)
    assert str(e.value) == f"{empty}: not a usable image (empty_file)" and e.value.reason == "empty_file"
    with pytest.raises(BadImageError, match=f"^{broken}: not a usable image \\(not_an_image: "):
        read_image_file(broken)
    with pytest.raises(BadImageError, match="cat: not a usable image \\(unreadable: IsADirectoryError"):
        read_image_file(tmp_path / "cat")
    assert read_image_file(_png(tmp_path / "ok.png")).mode == "RGB"


def _png(path):
    Image.new("L", (4, 3)).save(path)
    return path


def test_importing_a_library_sets_passive_openmp_before_torch_or_faiss():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import retrogen.retrieval, os, sys; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["PASSIVE", "False"]
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # an explicit user choice wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "ACTIVE"
