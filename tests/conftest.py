"""Shared fixtures: tiny random models in their standard layouts, and small image sets made on the fly.

Each engineer appends fixtures here; keep them session-scoped when they build models.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def tiny_open_clip_dir(tmp_path_factory):
    from tests.tiny_clip import build_tiny_open_clip

    return build_tiny_open_clip(tmp_path_factory.mktemp("tiny_open_clip"))


@pytest.fixture(scope="session")
def tiny_hf_clip_dir(tmp_path_factory):
    from tests.tiny_clip import build_tiny_hf_clip

    return build_tiny_hf_clip(tmp_path_factory.mktemp("tiny_hf_clip"))


@pytest.fixture(scope="session")
def onnx_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx_cache")


def colour_image(rgb, size=(40, 32), noise_seed=None) -> Image.Image:
    """A flat-colour image, optionally with a little noise (distinct bytes, near-identical content)."""
    arr = np.empty((size[1], size[0], 3), np.uint8)
    arr[:] = rgb
    if noise_seed is not None:
        rng = np.random.default_rng(noise_seed)
        arr = np.clip(arr.astype(int) + rng.integers(-6, 7, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random Stable Diffusion model directory (+ image encoder and IP-Adapter), see tests/tiny_sd.py."""
    from tests.tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "model")
