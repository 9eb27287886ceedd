"""generation: images are saved off the generation thread (a bounded queue to PNG encoder threads and one
ordered committer) with the same output as saving inline, errors surfacing, and memory bounded."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from retrogen.outputs import OutputFolder
from tests.test_generation import make_dataset, run

VOLATILE_SUMMARY = ("duration_s", "images_per_s", "timing_s")


def _folder(out):
    """Every file's bytes, with the records' and summary's times left out (they differ from run to run)."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*.png")}
    records = [{k: v for k, v in r.items() if k != "created"} for r in OutputFolder(out).records()]
    summary = {k: v for k, v in json.loads((out / "summary.json").read_text()).items() if k not in VOLATILE_SUMMARY}
    return files, records, summary


@pytest.mark.parametrize("method", ["prompt", "img2img"])
def test_threaded_saving_writes_what_inline_saving_writes(method, tmp_path, tiny_sd_dir):
    from retrogen.generation import GenerationConfig, augment_by_generation

    data = make_dataset(tmp_path / "data")
    cfg = GenerationConfig(num_inference_steps=2, size=64, batch_size=2)
    outs = {}
    for threads in (0, 3):
        out = tmp_path / f"out{threads}"
        augment_by_generation(data, out, model=str(tiny_sd_dir), method=method, per_class=5, config=cfg,
                              writer_threads=threads)
        outs[threads] = _folder(out)
    files, records, summary = outs[0]
    assert len(files) == 10 and outs[3][0] == files, "byte-identical images"
    assert outs[3][1] == records, "same records in the same order"
    assert [(r["label"], r["index"]) for r in records] == [(c, i) for c in ("cat", "dog") for i in range(5)]
    assert outs[3][2] == summary


def test_saved_png_is_what_diffusers_pil_output_gives(tmp_path, tiny_sd_dir):
    """The np -> PIL conversion off-thread matches diffusers' own output_type="pil" (same rounding)."""
    import io

    import torch
    from diffusers import StableDiffusionPipeline

    from retrogen.generation.writer import encode_png

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, height=64, width=64)
    pil = pipe("a cat", generator=torch.Generator().manual_seed(3), **kw).images[0]
    arr = pipe("a cat", generator=torch.Generator().manual_seed(3), output_type="np", **kw).images[0]
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    assert encode_png(arr) == buf.getvalue() and encode_png(pil) == buf.getvalue()


def test_a_saving_error_fails_the_job(tmp_path, tiny_sd_dir, monkeypatch):
    import retrogen.generation.writer as writer_mod

    calls = []
    real = writer_mod.encode_png

    def failing(image):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real(image)

    monkeypatch.setattr(writer_mod, "encode_png", failing)
    data = make_dataset(tmp_path / "data")
    with pytest.raises(OSError, match="disk full"):
        run(data, tmp_path / "out", tiny_sd_dir, "prompt", per_class=4)
    assert not (tmp_path / "out" / "summary.json").exists(), "no summary: the folder is not complete"
    assert len(OutputFolder(tmp_path / "out").records()) == 2, "images before the failure were saved"


class _FakeWriter:
    def __init__(self):
        self.records = []

    def add(self, *, label, filename, image_bytes, method, fields):
        self.records.append((label, filename, image_bytes))


def test_the_queue_bound_blocks_the_producer_and_order_holds():
    from retrogen.generation.writer import ImageSink

    release = threading.Event()
    started = []

    def slow_encode(image):
        started.append(image)
        release.wait(10)
        return bytes([image])

    writer = _FakeWriter()
    sink = ImageSink(writer, threads=2, max_pending=3, encode=slow_encode)
    done = threading.Event()

    def produce():
        for i in range(40):
            sink.put(label="c", filename=f"{i}.png", image=i, method="m", fields={})
        done.set()

    t = threading.Thread(target=produce)
    t.start()
    time.sleep(0.5)
    # the committer holds one, the queue max_pending, the producer one it is trying to queue: no more
    assert not done.is_set() and sink.submitted <= 3 + 2 and len(started) <= 3 + 2
    release.set()
    t.join(10)
    sink.close()
    assert done.is_set() and [r[2] for r in writer.records] == [bytes([i]) for i in range(40)]


def test_sink_errors_surface_on_put_flush_and_close():
    from retrogen.generation.writer import ImageSink

    def encode(image):
        if image == 2:
            raise ValueError("bad image 2")
        return b"x"

    writer = _FakeWriter()
    sink = ImageSink(writer, threads=1, max_pending=2, encode=encode)
    with pytest.raises(ValueError, match="bad image 2"):
        for i in range(50):
            sink.put(label="c", filename=f"{i}", image=i, method="m", fields={})
            time.sleep(0.005)
    with pytest.raises(ValueError, match="bad image 2"):
        sink.close()
    assert [r[1] for r in writer.records] == ["0", "1"], "nothing after the failure is written"


def test_to_pil_matches_numpy_to_pil():
    from diffusers.utils import numpy_to_pil

    from retrogen.generation.writer import to_pil

    arr = np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32)
    for a, ref in zip(arr, numpy_to_pil(arr), strict=True):
        assert np.array_equal(np.asarray(to_pil(a)), np.asarray(ref))
    assert isinstance(to_pil(ref), Image.Image)
