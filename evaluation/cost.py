"""The cost of an augmentation set, read from the ``summary.json`` and ``provenance.jsonl`` it was written with."""

from __future__ import annotations

import logging
from pathlib import Path

from retrogen.outputs import OutputFolder

log = logging.getLogger(__name__)


def augmentation_cost(set_dir: str | Path, num_images: int) -> dict:
    """Wall time, images/s, seconds and GPU-seconds per image of one augmentation output folder.

    GPU-seconds are the wall time when the set was made on a CUDA device (its summary's ``runtime.device`` or
    its records' ``device``), since one GPU was held throughout; None otherwise. Everything is None for a
    folder without ``summary.json`` (e.g. plain real images).
    """
    folder = OutputFolder(set_dir)
    out = {"method": None, "duration_s": None, "images_per_s": None, "seconds_per_image": None,
           "gpu_seconds_per_image": None, "device": None, "has_provenance": folder.has_provenance}
    if not folder.is_complete:
        return out
    try:
        summary = folder.summary()
    except ValueError as e:
        log.warning("unreadable summary in %s: %s; cost unknown", folder.path, e)
        return out
    duration = summary.get("duration_s")
    device = (summary.get("runtime") or {}).get("device")
    if device is None and out["has_provenance"]:
        device = next((r.get("device") for r in folder.iter_records()), None)
    out.update(method=summary.get("method"), duration_s=duration, images_per_s=summary.get("images_per_s"),
               device=device)
    if duration is not None and num_images:
        out["seconds_per_image"] = duration / num_images
        if device == "cuda":
            out["gpu_seconds_per_image"] = duration / num_images
    return out
