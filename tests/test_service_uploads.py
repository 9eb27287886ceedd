"""Hostile and malformed uploads: each gets a 4xx with a clear message and leaves nothing behind."""

from __future__ import annotations

import base64
import io
import os
import struct
import tarfile
import zipfile
import zlib

import pytest
from fastapi.testclient import TestClient

from tests.conftest import colour_image, png_bytes
from tests.service_fakes import dataset_files, fake_registry, make_settings, tar_bytes, zip_bytes


@pytest.fixture()
def env(tmp_path):
    from retrogen.service.api.main import create_app

    (tmp_path / "root" / "cat").mkdir(parents=True)
    (tmp_path / "root" / "cat" / "a.png").write_bytes(png_bytes(colour_image((1, 2, 3))))
    (tmp_path / "secret.png").write_bytes(png_bytes(colour_image((9, 9, 9))))
    os.symlink(tmp_path / "secret.png", tmp_path / "root" / "cat" / "link.png")
    settings = make_settings(tmp_path / "data", max_images_per_dataset=5, max_image_pixels=100_000,
                             max_upload_bytes=200_000, server_root=tmp_path / "root")
    app = create_app(settings, methods=fake_registry(), start_worker=False)
    return app, TestClient(app), tmp_path


def leftovers(app, tmp_path) -> list[str]:
    """Files anywhere under the data dir other than the database itself."""
    data = tmp_path / "data"
    return sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file() and "retrogen.db" not in p.name)


def post(client, data: bytes, name="up.bin"):
    return client.post("/v1/datasets", files={"file": (name, data, "application/octet-stream")})


def png_header_bomb(w=50_000, h=50_000) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb to a naive decoder)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


GOOD = dataset_files(per_class=1)


def _corrupt(data: bytes) -> bytes:
    """Flip bytes inside the first member's data: its CRC no longer matches."""
    b = bytearray(data)
    for i in range(60, 90):
        b[i] ^= 0xFF
    return bytes(b)


def _targz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()

CASES = {
    "zip traversal": (zip_bytes(GOOD | {"../evil/x.png": GOOD["cat/0.png"]}), 422, "outside"),
    "zip absolute": (zip_bytes(GOOD | {"/etc/x.png": GOOD["cat/0.png"]}), 422, "absolute"),
    "tar traversal": (tar_bytes(GOOD | {"cat/../../x.png": GOOD["cat/0.png"]}), 422, "outside"),
    "tar symlink": (tar_bytes(GOOD, links={"cat/l.png": (tarfile.SYMTYPE, "/etc/passwd")}), 422, "link"),
    "tar hardlink": (tar_bytes(GOOD, links={"cat/h.png": (tarfile.LNKTYPE, "cat/0.png")}), 422, "link"),
    "pixel bomb": (zip_bytes(GOOD | {"cat/bomb.png": png_header_bomb()}), 422, "too_many_pixels"),
    "not an image": (zip_bytes(GOOD | {"cat/x.png": b"this is text, not a png"}), 422, "cat/x.png"),
    "non-image file": (zip_bytes(GOOD | {"cat/notes.txt": b"hello"}), 422, "not an image file name"),
    "image at top level": (zip_bytes(GOOD | {"loose.png": GOOD["cat/0.png"]}), 422, "top level"),
    "too deep": (zip_bytes(GOOD | {"cat/sub/x.png": GOOD["cat/0.png"]}), 422, "too deep"),
    "too many images": (zip_bytes(dataset_files(per_class=3)), 413, "more than 5 images"),
    "corrupt member": (_corrupt(zip_bytes(GOOD)), 422, "cannot be read"),
    "truncated tar.gz": (_targz(GOOD)[:-40], 422, "tar"),
    "empty archive": (zip_bytes({}), 422, "no images"),
    "garbage": (b"\x00garbage" * 10, 422, "neither a zip nor a tar"),
    "over upload size": (b"\x00" * 250_000, 413, "limit"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_uploads_are_refused_cleanly(env, case):
    app, client, tmp_path = env
    good = post(client, zip_bytes(GOOD), "good.zip")
    assert good.status_code == 201
    before = leftovers(app, tmp_path)
    data, status, words = CASES[case]
    r = post(client, data)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert leftovers(app, tmp_path) == before  # nothing staged, stored or cached remains
    assert client.get("/v1/datasets").json()["count"] == 1  # the stored dataset is untouched
    assert client.get(f"/v1/datasets/{good.json()['id']}").json() == good.json()


def test_zip_bomb_by_ratio_is_refused(env):
    app, client, tmp_path = env
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cat/big.png", b"\0" * (40 * 1024 * 1024))  # 40 MB of zeros -> ~40 KB compressed
    r = post(client, buf.getvalue())
    assert r.status_code == 413 and "big.png" in r.json()["detail"]
    assert leftovers(app, tmp_path) == []


def test_wrapper_folder_and_tar_gz_accepted(env):
    _, client, _ = env
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in GOOD.items():
            info = tarfile.TarInfo(f"mydata/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("mydata/.DS_Store")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    r = post(client, buf.getvalue(), "d.tar.gz")
    assert r.status_code == 201, r.text
    assert r.json()["classes"] == {"cat": 1, "dog": 1}


def test_manifest_base64_and_server_paths(env):
    app, client, tmp_path = env
    b64 = base64.b64encode(GOOD["dog/0.png"]).decode()
    r = client.post("/v1/datasets/manifest", json={"name": "m", "images": [
        {"label": "dog", "data": b64}, {"label": "cat", "path": "cat/a.png"},
        {"label": "cat", "path": str(tmp_path / "root" / "cat" / "a.png"), "filename": "b.png"}]})
    assert r.status_code == 201, r.text
    assert r.json()["classes"] == {"cat": 2, "dog": 1}
    before = leftovers(app, tmp_path)
    bad = {
        "outside root": ({"label": "cat", "path": str(tmp_path / "secret.png")}, 403, "outside"),
        "dotdot": ({"label": "cat", "path": "../secret.png"}, 403, "outside"),
        "symlink out": ({"label": "cat", "path": "cat/link.png"}, 403, "outside"),
        "missing": ({"label": "cat", "path": "cat/none.png"}, 422, "no such file"),
        "bad base64": ({"label": "cat", "data": "!!!notbase64"}, 422, "base64"),
        "not image": ({"label": "cat", "data": base64.b64encode(b"hello").decode()}, 422, "not a usable image"),
        "bad label": ({"label": "..", "data": b64}, 422, "cannot be a folder name"),
    }
    for what, (item, status, words) in bad.items():
        r = client.post("/v1/datasets/manifest", json={"images": [{"label": "dog", "data": b64}, item]})
        assert r.status_code == status, (what, r.text)
        assert words in r.json()["detail"], what
    r = client.post("/v1/datasets/manifest", json={"images": [{"label": "cat", "data": b64, "path": "cat/a.png"}]})
    assert r.status_code == 422
    assert leftovers(app, tmp_path) == before


def test_server_paths_off_without_root(tmp_path):
    from retrogen.service.api.main import create_app

    client = TestClient(create_app(make_settings(tmp_path / "data"), methods=fake_registry(), start_worker=False))
    (tmp_path / "x.png").write_bytes(GOOD["cat/0.png"])
    r = client.post("/v1/datasets/manifest", json={"images": [{"label": "cat", "path": str(tmp_path / "x.png")}]})
    assert r.status_code == 403 and "server_root" in r.json()["detail"]


def _long_tar(name: str, data: bytes) -> bytes:
    """A PAX tar whose member name is stored whole (a PAX ``path`` record), NUL bytes included."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for n, d in (GOOD | {name: data}).items():
            info = tarfile.TarInfo(n)
            info.size = len(d)
            if len(n) > 100 or "\x00" in n:
                info.pax_headers = {"path": n}
            tar.addfile(info, io.BytesIO(d))
    return buf.getvalue()


@pytest.mark.parametrize("archive, words", [
    (zip_bytes(GOOD | {"cat/" + "a" * 300 + ".png": GOOD["cat/0.png"]}), "at most 255"),
    (zip_bytes(GOOD | {"é" * 150 + "/x.png": GOOD["cat/0.png"]}), "at most 255"),
    (_long_tar("cat/" + "b" * 120 + "\x00.png", GOOD["cat/0.png"]), "control character"),
    (_long_tar("cat/" + "c" * 260 + ".png", GOOD["cat/0.png"]), "at most 255"),
], ids=["zip long file name", "zip long class name", "tar NUL", "tar long name"])
def test_archive_member_names_the_filesystem_cannot_hold_are_a_4xx(env, archive, words):
    """Once a 500 (ENAMETOOLONG, 'embedded null byte' while writing the staged file)."""
    app, client, tmp_path = env
    r = post(client, archive)
    assert r.status_code == 422, r.text
    assert words in r.json()["detail"]
    assert leftovers(app, tmp_path) == []


def test_manifest_names_the_filesystem_cannot_hold_are_a_4xx(env):
    app, client, tmp_path = env
    b64 = base64.b64encode(GOOD["dog/0.png"]).decode()
    bad = {
        "NUL file name": ({"label": "cat", "data": b64, "filename": "a\x00.png"}, "control character"),
        "long file name": ({"label": "cat", "data": b64, "filename": "é" * 150 + ".png"}, "at most 255"),
        "long label": ({"label": "é" * 150, "data": b64}, "at most 255"),
        "NUL label": ({"label": "c\x00t", "data": b64}, "control character"),
        "NUL path": ({"label": "cat", "path": "cat/a\x00.png"}, "NUL"),
        "long path part": ({"label": "cat", "path": "cat/" + "p" * 300 + ".png"}, "cannot be read"),
    }
    for what, (item, words) in bad.items():
        r = client.post("/v1/datasets/manifest", json={"images": [item]})
        assert r.status_code == 422, (what, r.text)
        assert words in r.json()["detail"], (what, r.text)
    r = client.post("/v1/datasets/manifest", json={"name": "pets\x00", "images": [{"label": "cat", "data": b64}]})
    assert r.status_code == 422 and "name" in r.json()["detail"]
    assert leftovers(app, tmp_path) == []


def test_the_dataset_pixel_budget_is_charged_from_headers_before_decoding(tmp_path, monkeypatch):
    """Twenty 39.7 MP PNGs (each under the per-image limit; as 1-bit PNGs they zip to a few KB) would cost seconds
    of CPU and gigabytes each to decode: the budget refuses the dataset at the image that passes it, and that
    image is never decoded."""
    from retrogen.service.api.main import create_app
    from retrogen.service.domain import uploads

    decoded = []
    monkeypatch.setattr(uploads, "decode_image", lambda data, **kw: decoded.append(len(data)))
    settings = make_settings(tmp_path / "data", max_dataset_pixels=500_000_000)
    client = TestClient(create_app(settings, methods=fake_registry(), start_worker=False))
    bombs = {f"cat/{i:02d}.png": png_header_bomb(6300, 6300) for i in range(20)}  # 39.69 MP each
    r = post(client, zip_bytes(bombs))
    assert r.status_code == 413, r.text
    assert "more than 500000000 pixels" in r.json()["detail"] and "cat/12.png" in r.json()["detail"]
    assert len(decoded) == 12  # 12 x 39.69 MP fit in the 500 MP default; the 13th is refused from its header


def test_upload_decodes_are_bounded_process_wide(tmp_path, monkeypatch):
    """However many uploads arrive at once, at most ``max_concurrent_decodes`` images are being decoded."""
    import threading
    import time

    from retrogen.service.core.config import Settings
    from retrogen.service.domain import uploads

    active, peak, lock = [0], [0], threading.Lock()

    def slow_decode(data, **kw):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1

    monkeypatch.setattr(uploads, "decode_image", slow_decode)
    limits = uploads.UploadLimits.from_settings(Settings(data_dir=tmp_path, max_concurrent_decodes=2))
    assert limits.max_concurrent_decodes == 2
    archive = tmp_path / "d.zip"
    archive.write_bytes(zip_bytes(dataset_files(per_class=3)))
    staged, errors = [], []

    def upload():
        try:
            staged.append(uploads.stage_archive(archive, limits, tmp_path / "tmp"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=upload) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(staged) == 6
    assert peak[0] == 2, f"{peak[0]} images were decoded at once"
    for s in staged:
        uploads.cleanup_staged(s)
