"""The cost of an augmentation set, read from the ``summary.json`` and ``provenance.jsonl`` it was written with."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from retrogen.provenance import PROVENANCE_FILE, SUMMARY_FILE, read_provenance

log = logging.getLogger(__name__)


def augmentation_cost(set_dir: str | Path, num_images: int) -> dict:
    """Wall time, images/s, seconds and GPU-seconds per image of one augmentation output folder.

    GPU-seconds are the wall time when the set was made on a CUDA device (its summary's ``runtime.device`` or
    its records' ``device``), since one GPU was held throughout; None otherwise. Everything is None for a
    folder without ``summary.json`` (e.g. plain real images).
    """
    d = Path(set_dir)
    out = {"method": None, "duration_s": None, "images_per_s": None, "seconds_per_image": None,
           "gpu_seconds_per_image": None, "device": None, "has_provenance": (d / PROVENANCE_FILE).exists()}
    if not (d / SUMMARY_FILE).exists():
        return out
    try:
        summary = json.loads((d / SUMMARY_FILE).read_text())
    except ValueError as e:
        log.warning("unreadable %s: %s; cost unknown", d / SUMMARY_FILE, e)
        return out
    duration = summary.get("duration_s")
    device = (summary.get("runtime") or {}).get("device")
    if device is None and out["has_provenance"]:
        records = read_provenance(d)
        device = records[0].get("device") if records else None
    out.update(method=summary.get("method"), duration_s=duration, images_per_s=summary.get("images_per_s"),
               device=device)
    if duration is not None and num_images:
        out["seconds_per_image"] = duration / num_images
        if device == "cuda":
            out["gpu_seconds_per_image"] = duration / num_images
    return out
