"""``EvaluationConfig``: everything that shapes an evaluation besides the data, checked when it is built.

One name for kwarg, CLI flag (``retrogen evaluate``) and JSON key (the service's job params). The classifier
gets the part it trains with as :class:`TrainSettings`, derived here so that no value is checked twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from pydantic import Field

from retrogen.config import LibraryConfig

from .errors import InvalidEvaluationError

DEFAULT_EMBEDDER = "efficientnet-lite0:onnx"

ClassifierName = Literal["linear", "cnn"]
CLASSIFIERS: tuple[str, ...] = get_args(ClassifierName)
#: optimiser steps when ``num_steps`` is not given
DEFAULT_STEPS = {"linear": 300, "cnn": 600}


@dataclass(frozen=True)
class TrainSettings:
    """How each classifier is trained (the same for every arm, so arms differ only in their data).

    Built by :meth:`EvaluationConfig.settings`, whose fields carry the checks.
    """

    num_steps: int = 300
    batch_size: int = 64
    learning_rate: float | None = None  # None: linear 1e-2, cnn 2e-3
    weight_decay: float = 1e-4
    ratio: float | None = None  # DA-Fusion's p: share of augmentation samples per batch; None: uniform
    aug_label_smoothing: float = 0.0  # label smoothing applied to augmentation samples only


class EvaluationConfig(LibraryConfig):
    """Classifier, features, seeds, mixing and guard-rail settings of :func:`~retrogen.evaluation.evaluate`."""

    error = InvalidEvaluationError
    kind = "evaluation"

    classifier: ClassifierName = Field(
        "linear", description="linear (probe on frozen features) or cnn (small CNN on 32 px pixels).")
    embedder: str = Field(
        DEFAULT_EMBEDDER, description="Features for the linear probe and leakage check (a retrieval embedder name, "
        "or pixels[:SIDE]).")
    num_seeds: int = Field(3, ge=1, description="Training seeds per method.", json_schema_extra={"cli": ["--seeds"]})
    ratio: float | None = Field(
        None, ge=0.0, le=1.0, description="Share of augmentation samples per batch (DA-Fusion's p); default: "
        "uniform over real + augmentation.")
    aug_label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0, description="Label smoothing for augmentation samples only.")
    cap_per_class: int | None = Field(
        None, ge=0, description="Use at most this many augmentation images per class.")
    num_steps: int | None = Field(None, ge=1, description="Optimiser steps (default: linear 300, cnn 600).")
    batch_size: int = Field(64, ge=1, description="Samples per optimiser step.")
    leakage_threshold: float = Field(
        0.95, ge=-1.0, le=1.0, description="Cosine in the embedder's space at or above which a test image counts "
        "as leaked.")
    enable_leakage_check: bool = Field(
        True, description="Refuse augmentation sets holding (near) copies of test images.")
    confidence: float = Field(0.95, ge=0.5, lt=1.0, description="Confidence level of the gain's bootstrap interval.")
    seed: int = Field(0, ge=0, description="First seed; the seeds used are seed, seed + 1, ...")

    def settings(self) -> TrainSettings:
        """What the classifier trains with; ``num_steps`` defaults by classifier."""
        steps = self.num_steps if self.num_steps is not None else DEFAULT_STEPS[self.classifier]
        return TrainSettings(num_steps=steps, batch_size=self.batch_size, ratio=self.ratio,
                             aug_label_smoothing=self.aug_label_smoothing)

    @property
    def seeds(self) -> list[int]:
        """The training seeds, the same for every arm (the gain's bootstrap pairs them)."""
        return [self.seed + s for s in range(self.num_seeds)]
