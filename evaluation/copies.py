"""Copies between image sets, decided in pixel space so that the answer does not depend on an embedding.

An embedder's cosine cannot separate "the same image, re-encoded" from "a different image of the same kind":
in EfficientNet space distinct Fashion-MNIST items reach 0.977 while JPEG re-encodes score 0.975-0.985. So
embeddings (and a cheap pixel vector) only *propose* candidates, the nearest few reference images of each
image, and pixels decide:

1. **exact**: the same file bytes, or the same decoded pixels;
2. **near**: align the two images (crops of either one, up to 15% of each axis, found by a coarse grid
   then a local search on each side's margin, scored by gradient correlation; pairs whose best grid crop
   correlates under 0.5 are different images), match the reference's intensities to the query's by rank
   (so brightness, contrast, gamma and clipping drop out), and take the largest residual of any 8x8 patch
   relative to the query's contrast. A re-encode, resize, small crop or colour jitter of one image leaves every patch close; two
   different images differ somewhere. The threshold, ``near_copy_residual``, is 0.16 by default.

Calibration (Fashion-MNIST test images, upscaled to 112 px, nearest distinct neighbours vs transformed copies):
docs/evaluation.md and ``tests/test_evaluation_copies.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from retrogen.fileio import sha256_bytes

BASE = 128  # luminance kept per image, px (what alignment crops from)
SEARCH_SIDE, SEARCH_BLUR = 24, 4.0  # alignment runs on small gradient maps (blur: px of the BASE image)
CHECK_SIDE, CHECK_BLUR, PATCH = 48, 3.0, 8  # the residual is measured at this size, per PATCH x PATCH block
MAX_CROP = 0.15  # most of an axis a copy may have lost (both sides together)
MIN_CONTRAST = 2.0  # grey levels: a flatter image has no structure to compare, so only exact copies count
#: crops tried first, as the share cut off each side (left, top, right, bottom); the best is refined locally
GRID = [(lf, tp, rt, bt) for lf in (0, 0.07) for tp in (0, 0.07) for rt in (0, 0.07) for bt in (0, 0.07)] + [
    (m, m, m, m) for m in (0.035,)]
IDENTITY = GRID.index((0, 0, 0, 0))
REFINE_STEPS = (0.04, 0.02, 0.01, 0.005)  # margin steps, one round each
GATE = 0.5  # best grid correlation below which two images are not aligned further (not copies)
METHOD = ("exact bytes or decoded pixels; near copies: candidates from embedding and pixel neighbours, then "
          "crop alignment (up to 15% per axis, grid then per-side search) on gradient maps, rank-matched "
          "intensities, and the largest 8x8-patch residual relative to the image's contrast")


@dataclass(frozen=True)
class Fingerprint:
    """What copy detection keeps of one image (a few KB, whatever the image's size)."""

    sha256: str  # of the file's bytes
    pixels_sha256: str  # of the decoded RGB pixels
    gray: np.ndarray  # (BASE, BASE) uint8 luminance


def fingerprint(image: Image.Image, file_sha256: str) -> Fingerprint:
    """The fingerprint of a decoded RGB image."""
    pixels = sha256_bytes(np.asarray(image).tobytes() + f"{image.size}".encode())
    gray = np.asarray(image.convert("L").resize((BASE, BASE), Image.BILINEAR), np.uint8)
    return Fingerprint(file_sha256, pixels, gray)


@dataclass(frozen=True)
class FingerprintSet:
    """One image set's fingerprints, ids and embedding vectors, in the same order."""

    ids: list[str]
    prints: list[Fingerprint]
    vecs: np.ndarray  # (n, dim) L2-normalised embedder features

    def pixel_vectors(self) -> np.ndarray:
        """(n, d) unit vectors of each whole image's gradient map: candidates by pixels."""
        whole = np.zeros((1, 4), np.float32)
        if not self.prints:
            return np.zeros((0, (SEARCH_SIDE - 1) ** 2), np.float32)
        return np.concatenate([_gradient_vectors(_sample(_blurred(p.gray, SEARCH_BLUR), whole, SEARCH_SIDE))
                               for p in self.prints])


@dataclass(frozen=True)
class CopyPair:
    """``image`` (of the set checked) copies ``reference`` (a test image): how, and how closely."""

    image: str
    reference: str
    kind: str  # "bytes" | "pixels" | "near"
    residual: float  # 0 for exact copies

    def as_dict(self, set_name: str) -> dict:
        return {"set": set_name, "image": self.image, "test": self.reference, "kind": self.kind,
                "residual": round(self.residual, 4)}


def find_copies(query: FingerprintSet, reference: FingerprintSet, *, threshold: float, candidates: int,
                views: ViewCache | None = None) -> list[CopyPair]:
    """Every (query image, reference image) pair that is an exact or near copy, in query order.

    ``views`` caches each image's crop views; pass one cache to several calls that share a reference set.
    """
    views = views if views is not None else ViewCache()
    exact = {p.sha256: i for i, p in enumerate(reference.prints)}
    exact_pixels = {p.pixels_sha256: i for i, p in enumerate(reference.prints)}
    out: list[CopyPair] = []
    for qi, ri in _candidate_pairs(query, reference, candidates):
        q, r = query.prints[qi], reference.prints[ri]
        if q.sha256 == r.sha256 or q.pixels_sha256 == r.pixels_sha256:
            continue  # found below, once
        residual = near_copy_residual(q, r, views)
        if residual <= threshold:
            out.append(CopyPair(query.ids[qi], reference.ids[ri], "near", residual))
    for qi, q in enumerate(query.prints):
        if q.sha256 in exact:
            out.append(CopyPair(query.ids[qi], reference.ids[exact[q.sha256]], "bytes", 0.0))
        elif q.pixels_sha256 in exact_pixels:
            out.append(CopyPair(query.ids[qi], reference.ids[exact_pixels[q.pixels_sha256]], "pixels", 0.0))
    order = {name: i for i, name in enumerate(query.ids)}
    return sorted(out, key=lambda c: (order[c.image], c.reference))


class ViewCache:
    """Each image's blurred luminance and its gradient vectors at every GRID crop, computed once per check."""

    def __init__(self) -> None:
        self._prepared: dict[str, _Prepared] = {}

    def __call__(self, fp: Fingerprint) -> _Prepared:
        prepared = self._prepared.get(fp.pixels_sha256)
        if prepared is None:
            search = _blurred(fp.gray, SEARCH_BLUR)
            views = _gradient_vectors(_sample(search, np.array(GRID, np.float32), SEARCH_SIDE))
            prepared = self._prepared[fp.pixels_sha256] = _Prepared(search, _blurred(fp.gray, CHECK_BLUR), views)
        return prepared


@dataclass(frozen=True)
class _Prepared:
    search: np.ndarray  # (BASE, BASE) float32, blurred for sampling at SEARCH_SIDE
    check: np.ndarray  # (BASE, BASE) float32, blurred for sampling at CHECK_SIDE
    views: np.ndarray  # (len(GRID), d) gradient vectors of the GRID crops


def _candidate_pairs(query: FingerprintSet, reference: FingerprintSet, k: int) -> Iterator[tuple[int, int]]:
    """(query index, reference index) of each query's ``k`` nearest references by embedding and by pixels."""
    if not query.prints or not reference.prints:
        return
    k = min(k, len(reference.prints))
    ref_pixels = reference.pixel_vectors()
    for start in range(0, len(query.prints), 512):
        stop = min(start + 512, len(query.prints))
        sims = query.vecs[start:stop] @ reference.vecs.T
        pix = FingerprintSet(query.ids[start:stop], query.prints[start:stop], query.vecs[start:stop]).pixel_vectors()
        pixel_sims = pix @ ref_pixels.T
        for row, (s, p) in enumerate(zip(sims, pixel_sims, strict=True)):
            for ri in sorted(set(np.argsort(-s)[:k].tolist()) | set(np.argsort(-p)[:k].tolist())):
                yield start + row, int(ri)


def near_copy_residual(a: Fingerprint, b: Fingerprint, views: ViewCache) -> float:
    """How far ``a`` and ``b`` are from being one image (0: identical); either may be a crop of the other.

    Infinity when no crop on the grid correlates above GATE (clearly different images, decided cheaply) and
    for flat images (contrast under MIN_CONTRAST grey levels: nothing to compare).
    """
    if min(float(a.gray.std()), float(b.gray.std())) < MIN_CONTRAST:
        return float("inf")
    pa, pb = views(a), views(b)
    a_in_b, b_in_a = pb.views @ pa.views[IDENTITY], pa.views @ pb.views[IDENTITY]  # a whole vs crops of b, ...
    if max(a_in_b.max(), b_in_a.max()) < GATE:
        return float("inf")
    # either may be the crop: refine both ways from their best grid crops, keep the better alignment
    tries = [(q, r, *_refine(q, r, GRID[int(s.argmax())], float(s.max())))
             for q, r, s in ((pa, pb, a_in_b), (pb, pa, b_in_a)) if s.max() >= GATE]
    q, r, crop, _ = max(tries, key=lambda t: t[3])
    return _residual(q, r, crop)


def _blurred(gray: np.ndarray, sigma: float) -> np.ndarray:
    """Luminance blurred once at full size, so crops can be sampled with no aliasing and no further blur."""
    return np.asarray(Image.fromarray(gray).filter(ImageFilter.GaussianBlur(sigma)), np.float32)


def _sample(base: np.ndarray, crops: np.ndarray, side: int) -> np.ndarray:
    """(n, side, side) bilinear samples of ``base`` over each crop (left, top, right, bottom margins)."""
    t = (np.arange(side, dtype=np.float32) + 0.5) / side
    x0, y0 = BASE * crops[:, 0:1], BASE * crops[:, 1:2]
    xs = x0 + (BASE * (1 - crops[:, 2:3]) - x0) * t - 0.5  # (n, side) base coordinates
    ys = y0 + (BASE * (1 - crops[:, 3:4]) - y0) * t - 0.5
    xi, yi = np.clip(np.floor(xs), 0, BASE - 2).astype(np.int64), np.clip(np.floor(ys), 0, BASE - 2).astype(np.int64)
    wx, wy = np.clip(xs - xi, 0, 1)[:, None, :], np.clip(ys - yi, 0, 1)[:, :, None]
    yy, xx = yi[:, :, None], xi[:, None, :]
    top = base[yy, xx] * (1 - wx) + base[yy, xx + 1] * wx
    bottom = base[yy + 1, xx] * (1 - wx) + base[yy + 1, xx + 1] * wx
    return top * (1 - wy) + bottom * wy


def _gradient_vectors(views: np.ndarray) -> np.ndarray:
    """(n, d) unit vectors of each view's gradient magnitude, mean removed: structure, not brightness."""
    g = np.hypot(np.diff(views, axis=2)[:, :-1, :], np.diff(views, axis=1)[:, :, :-1]).reshape(len(views), -1)
    g = g - g.mean(axis=1, keepdims=True)
    return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-6)


def _moves(crop: tuple[float, float, float, float], step: float) -> np.ndarray:
    """(8, 4): ``crop`` with one side's margin moved by ±step, within [0, MAX_CROP - the opposite margin]."""
    out = np.tile(np.array(crop, np.float32), (8, 1))
    for k, (side, d) in enumerate((side, d) for side in range(4) for d in (step, -step)):
        out[k, side] = min(MAX_CROP - out[k, (side + 2) % 4], max(0.0, out[k, side] + d))
    return out


def _refine(query: _Prepared, reference: _Prepared, crop: tuple[float, float, float, float],
            best: float) -> tuple[tuple[float, float, float, float], float]:
    """Local search from a grid crop of ``reference`` for the one that best matches the whole ``query``:
    (crop, its gradient correlation). Each round moves to the best of the eight one-side moves while any helps."""
    target = query.views[IDENTITY]
    for step in REFINE_STEPS:
        while True:
            moves = _moves(crop, step)
            scores = _gradient_vectors(_sample(reference.search, moves, SEARCH_SIDE)) @ target
            if scores.max() <= best + 1e-6:
                break
            best, crop = float(scores.max()), tuple(float(v) for v in moves[int(scores.argmax())])
    return crop, best


def _residual(query: _Prepared, reference: _Prepared, crop: tuple[float, float, float, float]) -> float:
    """The largest 8x8-patch RMS of query minus the rank-matched reference crop, over the query's contrast."""
    whole = np.array([(0, 0, 0, 0)], np.float32)
    a = _sample(query.check, whole, CHECK_SIDE).ravel()
    b = _sample(reference.check, np.array([crop], np.float32), CHECK_SIDE).ravel()
    matched = np.empty_like(b)
    matched[np.argsort(b, kind="stable")] = np.sort(a)  # b's intensities mapped onto a's, order kept
    blocks = (a - matched).reshape(CHECK_SIDE // PATCH, PATCH, CHECK_SIDE // PATCH, PATCH)
    patch_rms = np.sqrt((blocks ** 2).mean(axis=(1, 3)))
    return float(patch_rms.max() / (a.std() + 1e-6))
