"""The cost of an augmentation set, read from the ``summary.json`` and ``provenance.jsonl`` it was written with.

A retrieved set also records what building its index cost (``index_build.duration_s``); that is reported
apart, divided over the images the arm retrieved from the index (each index counted once per arm): the cost
per image if the index was built for these sets alone. An index shared by many jobs costs less per image.
"""

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
           "gpu_seconds_per_image": None, "device": None, "has_provenance": folder.has_provenance,
           "index_id": None, "index_build_s": None}
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
               device=device, index_id=summary.get("index_id"),
               index_build_s=(summary.get("index_build") or {}).get("duration_s"))
    if duration is not None and num_images:
        out["seconds_per_image"] = duration / num_images
        if device == "cuda":
            out["gpu_seconds_per_image"] = duration / num_images
    return out


def arm_cost(sets: list[tuple[str | Path, int]]) -> dict:
    """One arm's cost over its sets (one per draw, or one shared): (folder, images used) each.

    Seconds per image pool the sets' wall time over their images; the index build is counted once per index.
    """
    costs = [augmentation_cost(d, n) for d, n in sets]
    known = [(c, n) for c, (_, n) in zip(costs, sets, strict=True) if c["duration_s"] is not None and n]
    images = sum(n for _, n in known)
    builds = {c["index_id"]: c["index_build_s"] for c in costs if c["index_id"] and c["index_build_s"] is not None}
    devices = sorted({c["device"] for c in costs if c["device"]})
    seconds = sum(c["duration_s"] for c, _ in known)
    return {"method": next((c["method"] for c in costs if c["method"]), None), "num_sets": len(sets),
            "duration_s": seconds if known else None, "seconds_per_image": seconds / images if images else None,
            "gpu_seconds_per_image": seconds / images if images and devices == ["cuda"] else None,
            "device": ",".join(devices) or None, "index_build_s": sum(builds.values()) if builds else None,
            "index_build_seconds_per_image": sum(builds.values()) / images if builds and images else None}
