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


def test_importing_a_library_sets_passive_openmp_before_torch_or_faiss():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import retrogen.retrieval, os, sys; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["PASSIVE", "False"]
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # an explicit user choice wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "ACTIVE"
