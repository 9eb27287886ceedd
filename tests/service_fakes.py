"""Fakes and helpers for the service tests: fake augmentation runners (real output folders, no models),
settings in a temp folder, zip/tar builders, and an entry point that runs a worker or a server in a
subprocess with the fake runners (for the kill -9 and real-uvicorn tests)."""

from __future__ import annotations

import io
import json
import sys
import tarfile
import time
import zipfile

from retrogen.errors import InvalidInputError
from retrogen.outputs import OutputFolder
from retrogen.progress import ProgressEvent, check_cancel
from tests.conftest import colour_image, png_bytes

COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "fox": (40, 40, 200)}


def fake_runner(kind: str):
    """Writes ``per_class`` PNGs per class (``params.delay_s`` per image), with progress and cancel checks."""

    def run(ctx):
        from retrogen.imagefolder import class_names, scan_imagefolder

        classes = class_names(scan_imagefolder(ctx.dataset_dir))
        delay = float(ctx.params.get("delay_s", 0))
        total = ctx.per_class * len(classes)
        with OutputFolder.create(ctx.out_dir) as w:
            for ci, label in enumerate(classes):
                for i in range(ctx.per_class):
                    check_cancel(ctx.should_cancel)
                    time.sleep(delay)
                    data = png_bytes(colour_image(COLOURS.get(label, (90, 90, 90)), size=(16, 16), noise_seed=i))
                    w.add(label=label, filename=f"{i:05d}.png", image_bytes=data, method=f"fake-{kind}",
                          fields={"seed": i, "job": ctx.job_id})
                    ctx.progress(ProgressEvent("write", i + 1, ctx.per_class, label,
                                               extra={"overall_done": ci * ctx.per_class + i + 1,
                                                      "overall_total": total}))
            w.close({"method": f"fake-{kind}", "per_class": {c: {"requested": ctx.per_class,
                                                                   "returned": ctx.per_class, "reason": None}
                                                               for c in classes}})

    return run


def fake_registry():
    from retrogen.service.domain.runners import MethodRegistry, MethodSpec

    def validate(params):
        unknown = set(params) - {"delay_s", "mode"}
        if unknown:
            raise InvalidInputError(f"unknown parameter(s) {sorted(unknown)}")

    def boom(ctx):
        raise RuntimeError("the fake runner crashed")

    def bad(ctx):
        raise InvalidInputError("the fake runner refuses this dataset")

    reg = MethodRegistry()
    reg.register(MethodSpec("fake-retrieval", "retrieval", fake_runner("retrieval"), validate=validate))
    reg.register(MethodSpec("fake-generation", "generation", fake_runner("generation"), validate=validate))
    reg.register(MethodSpec("boom", "retrieval", boom))
    reg.register(MethodSpec("bad", "retrieval", bad))
    return reg


def make_settings(data_dir, **overrides):
    from retrogen.service.core.config import Settings

    base = dict(data_dir=data_dir, poll_interval_s=0.05, job_lease_s=2.0, enable_worker=False)
    return Settings(**(base | overrides))


def dataset_files(per_class=2, classes=("cat", "dog")) -> dict[str, bytes]:
    return {f"{c}/{i}.png": png_bytes(colour_image(COLOURS[c], size=(20, 20), noise_seed=i))
            for c in classes for i in range(per_class)}


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_bytes(files: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    """``links``: name -> (tarfile.SYMTYPE/LNKTYPE, target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def _main() -> None:
    """``python -m tests.service_fakes worker|serve SETTINGS_JSON [PORT]``."""
    import logging

    from retrogen.service.core.config import Settings

    logging.basicConfig(level=logging.INFO)
    what, settings = sys.argv[1], Settings(**json.loads(sys.argv[2]))
    if what == "worker":
        from retrogen.service.wiring import Services

        Services.from_settings(settings, methods=fake_registry()).worker.run_forever()
    else:
        import uvicorn

        from retrogen.service.api.main import create_app

        app = create_app(settings, methods=fake_registry(), start_worker=True)
        uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[3]), log_level="warning")


if __name__ == "__main__":
    _main()
