"""``EvaluationConfig``: everything that shapes an evaluation besides the data, checked when it is built.

One name for kwarg, CLI flag (``retrogen evaluate``) and JSON key (the service's job params). Each classifier's
protocol (regularisation, learning rate, steps, the selection rule) is a setting here and is written into the
report; settings that touch augmentation samples only (ratio, label smoothing, cap) are off by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from retrogen.config import LibraryConfig

from .errors import InvalidEvaluationError

DEFAULT_EMBEDDER = "efficientnet-lite0:onnx"

ClassifierName = Literal["linear", "cnn", "stagewise"]
CLASSIFIERS: tuple[str, ...] = get_args(ClassifierName)
LeakPolicy = Literal["refuse", "exclude"]


@dataclass(frozen=True)
class TrainSettings:
    """How each classifier is trained: the same for every arm, so arms differ only in their data."""

    num_steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    linear_c: float | None  # None: chosen on the real training images by cross-validation over linear_c_grid
    linear_c_grid: tuple[float, ...]
    ratio: float | None  # DA-Fusion's p: share of augmentation samples per batch; None: uniform over the union
    aug_label_smoothing: float  # label smoothing applied to augmentation samples only


class EvaluationConfig(LibraryConfig):
    """Classifier protocol, draws, seeds, mixing and leak-check settings of :func:`~retrogen.evaluation.evaluate`."""

    error = InvalidEvaluationError
    kind = "evaluation"

    classifier: ClassifierName = Field(
        "linear", description="linear: logistic regression on frozen embedder features, C chosen on the real "
        "images; cnn: a small CNN trained end to end on 32 px pixels; stagewise: that CNN, then its classifier "
        "head re-fit on the real images only (SWAT's recipe against the domain gap of added data).")
    embedder: str = Field(
        DEFAULT_EMBEDDER, description="Features for the linear classifier and the leak check's candidates (a "
        "retrieval embedder name, or pixels[:SIDE]).")
    shots: int | None = Field(
        None, ge=1, description="Draw this many training images per class from --train (default: use them all).")
    draws: int = Field(
        1, ge=1, description="How many times to draw --shots images per class; every arm uses the same draws, and "
        "the interval covers the variance between draws.")
    num_seeds: int = Field(3, ge=1, description="Training seeds per draw (the cnn's; the linear classifier is "
                           "deterministic and runs once).", json_schema_extra={"cli": ["--seeds"]})
    compare: tuple[str, ...] = Field(
        (), description="A,B: also report the paired difference of arm A over arm B, with its interval; repeatable.")
    linear_c: float | None = Field(
        None, gt=0, description="Inverse L2 strength of the linear classifier; default: chosen per draw by "
        "stratified cross-validation on the real training images among --linear-c-grid.")
    linear_c_grid: tuple[float, ...] = Field(
        (0.01, 0.1, 1.0, 10.0, 100.0), min_length=1, description="Candidates for the linear classifier's C.")
    num_steps: int = Field(600, ge=1, description="Optimiser steps of the cnn (AdamW, cosine schedule).")
    batch_size: int = Field(64, ge=1, description="Samples per cnn optimiser step.")
    learning_rate: float = Field(2e-3, gt=0, description="Peak learning rate of the cnn.")
    weight_decay: float = Field(5e-4, ge=0, description="AdamW weight decay of the cnn.")
    ratio: float | None = Field(
        None, ge=0.0, le=1.0, description="Augmentation samples only: their share of each cnn batch, or of the "
        "linear classifier's sample weight (DA-Fusion's p); default: every image counts once.")
    aug_label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0, description="Augmentation samples only: label smoothing (cnn classifiers).")
    cap_per_class: int | None = Field(
        None, ge=0, description="Augmentation samples only: use at most this many images per class.")
    enable_leakage_check: bool = Field(
        True, description="Look for exact and near copies between every augmentation set and the test set, and "
        "between train and test.")
    leak_policy: LeakPolicy = Field(
        "refuse", description="What a found copy does: refuse (stop, naming every pair) or exclude (drop the "
        "copying augmentation images, and test images that copy training images, from every arm).")
    near_copy_residual: float = Field(
        0.16, gt=0, lt=1, description="Near-copy threshold: the largest patch residual between two aligned, "
        "intensity-matched images, relative to the image's contrast (calibration: docs/evaluation.md).")
    leak_candidates: int = Field(
        3, ge=1, le=50, description="Nearest test images per image (by embedding and by pixels) checked for a copy.")
    confidence: float = Field(0.95, ge=0.5, lt=1.0, description="Confidence level of the intervals.")
    seed: int = Field(0, ge=0, description="First seed; draws and training seeds derive from it.")

    @field_validator("compare")
    @classmethod
    def _pairs(cls, pairs: tuple[str, ...]) -> tuple[str, ...]:
        for p in pairs:
            a, sep, b = p.partition(",")
            if not sep or not a or not b or a == b or "," in b:
                raise ValueError(f"{p!r} is not two different arm names A,B")
        return pairs

    @model_validator(mode="after")
    def _consistent(self) -> EvaluationConfig:
        if self.draws > 1 and self.shots is None:
            raise ValueError("draws > 1 needs shots: without it every draw would be the whole train set")
        if self.aug_label_smoothing and self.classifier == "linear":
            raise ValueError("aug_label_smoothing needs a cnn classifier (logistic regression takes hard labels)")
        return self

    def settings(self) -> TrainSettings:
        """What every classifier trains with."""
        return TrainSettings(num_steps=self.num_steps, batch_size=self.batch_size, learning_rate=self.learning_rate,
                             weight_decay=self.weight_decay, linear_c=self.linear_c, linear_c_grid=self.linear_c_grid,
                             ratio=self.ratio, aug_label_smoothing=self.aug_label_smoothing)

    @property
    def seeds(self) -> list[int]:
        """The training seeds of each draw, the same for every arm (the interval pairs them)."""
        return [self.seed] if self.classifier == "linear" else [self.seed + s for s in range(self.num_seeds)]

    @property
    def comparisons(self) -> list[tuple[str, str]]:
        return [tuple(p.split(",")) for p in self.compare]  # type: ignore[misc]

    def aug_settings(self) -> dict[str, float | int | None]:
        """The settings that treat augmentation samples differently, as each arm's report shows them."""
        return {"ratio": self.ratio, "aug_label_smoothing": self.aug_label_smoothing,
                "cap_per_class": self.cap_per_class}
