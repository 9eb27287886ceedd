"""Pluggable safety classifiers for tests, loaded by import path as an operator's would be
(``tests.safety_fakes:reddish``)."""

from __future__ import annotations

import numpy as np


class Reddish:
    """Scores a decoded image by how red it is: the mean red channel minus the others, in [0, 1]."""

    name = "tests:reddish"
    needs_images = True

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, embeddings, images):
        self.calls += 1
        assert images is not None and len(images) == len(embeddings)
        rgb = np.stack([np.asarray(im.convert("RGB"), np.float32).mean(axis=(0, 1)) for im in images]) / 255.0
        return np.clip(rgb[:, 0] - rgb[:, 1:].mean(axis=1), 0.0, 1.0)


def reddish(embedder):
    return Reddish()


def not_a_classifier(embedder):
    return "nope"
