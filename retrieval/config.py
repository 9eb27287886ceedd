"""``RetrievalConfig``: everything that shapes a retrieval augmentation besides the dataset, corpus and N.

A :class:`~retrogen.config.LibraryConfig`: each field's constraint is checked when the config is built, and
its description is the help of the ``retrogen augment retrieve`` option derived from it.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator

from retrogen.config import LibraryConfig
from retrogen.imageio import DEFAULT_MAX_PIXELS
from retrogen.prompts import ZERO_SHOT_TEMPLATES

from .errors import InvalidRetrievalConfigError

# Bounds that keep one request's work and stored parameters sane (a job's params are stored and listed).
_Prompt = Annotated[str, Field(min_length=1, max_length=300)]
_ClassName = Annotated[str, Field(min_length=1, max_length=200)]
MAX_PROMPTS = 64  # templates, and prompts per class
MAX_CLASSES = 10_000
MAX_NPROBE = 65_536  # IVF lists / HNSW efSearch: beyond this a search is a scan
MAX_CANDIDATES = 1_000_000
MAX_BATCH = 4096
MAX_OPT_OUT = 100_000
MAX_DIVERSITY_POOL = 20_000  # above diverse.GROUND_MAX a sampled ground set (256 rows at 20k: 75 MB peak)


class RetrievalConfig(LibraryConfig):
    """Retrieval settings. Thresholds are cosine similarities in the index embedder's space; None disables a filter."""

    error: ClassVar[type[InvalidRetrievalConfigError]] = InvalidRetrievalConfigError
    kind: ClassVar[str] = "retrieval"

    dedup_threshold: float | None = Field(
        0.97, ge=-1.0, le=1.0, description="Cosine at or above which two results are near-duplicates.")
    leakage_threshold: float | None = Field(
        0.95, ge=-1.0, le=1.0, description="Cosine at or above which a result leaks a training or held-out image.")
    min_similarity: float | None = Field(
        None, ge=-1.0, le=1.0, description="Drop results less similar than this to their query.")
    conflict: Literal["assign", "drop"] = Field(
        "assign", description="An item wanted by two classes: assign (to the closer class) | drop.")
    label_check: bool = Field(
        False, description="Keep only results whose zero-shot class over the class names is their class.")
    label_check_embedder: str | None = Field(
        None, max_length=500, description="Image-text embedder for the label check; default: the index's own.")
    templates: tuple[_Prompt, ...] = Field(
        ZERO_SHOT_TEMPLATES, min_length=1, max_length=MAX_PROMPTS,
        description="Prompt templates for text queries and the label check ({} = class name).")
    class_descriptions: dict[_ClassName, Annotated[list[_Prompt], Field(max_length=MAX_PROMPTS)]] | None = Field(
        None, max_length=MAX_CLASSES,
        description="Per-class prompt lists that replace the templates: {label: list of prompts}.")
    selection: Literal["knn", "diverse"] = Field(
        "knn", description="How each class's candidates are ordered before the filters: knn (most similar first, "
        "round-robin over queries) | diverse (greedy facility-location mutual information, COBRA-style).")
    diversity_pool: int | None = Field(
        None, ge=1, le=MAX_DIVERSITY_POOL,
        description="diverse: candidates per class (the top of the kNN order) the greedy chooses among; default "
        "2 x N. Larger pools spread wider but reach further from the class (docs/retrieval-selection.md).")
    diversity_eta: float = Field(
        1.0, gt=0.0, le=100.0, description="diverse: how far coverage may reach beyond relevance (larger: wider).")
    opt_out: tuple[Annotated[str, Field(min_length=1, max_length=2048)], ...] = Field(
        (), max_length=MAX_OPT_OUT,
        description="Never return these items: source URLs, sha256 hashes of the stored bytes, or domains "
        "(with their subdomains). Repeat the option per entry.")
    respect_corpus_opt_out: bool = Field(
        True, description="Never return items the corpus itself marks opted out (its opt_out column).")
    max_punsafe: float | None = Field(
        None, ge=0.0, le=1.0, description="Drop items whose corpus punsafe score (LAION's NSFW probability) is "
        "above this; items with no score are kept and counted. Needs an index with a punsafe column.")
    max_pwatermark: float | None = Field(
        None, ge=0.0, le=1.0, description="Drop items whose corpus pwatermark score is above this (as max_punsafe).")
    nsfw_exclude: tuple[Annotated[str, Field(min_length=1, max_length=32)], ...] = Field(
        (), max_length=8, description="Drop items whose corpus NSFW tag is one of these (LAION: NSFW, UNSURE, "
        "UNLIKELY). Repeat the option per tag.")
    safety_classifier: str | None = Field(
        None, min_length=1, max_length=200, description="Drop items an unsafe-image classifier scores at or above "
        "safety_threshold: zero-shot:violence | zero-shot:nsfw | package.module:factory (docs/retrieval-selection.md).")
    safety_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="safety_classifier: the score from which an item counts as unsafe.")
    class_synonyms: dict[_ClassName, Annotated[list[_Prompt], Field(max_length=MAX_PROMPTS)]] | None = Field(
        None, max_length=MAX_CLASSES,
        description="caption mode: {label: more names} whose captions also match the class (the name itself "
        "always does; underscores read as spaces).")
    caption_rerank: Literal["auto", "text", "image", "none"] = Field(
        "auto", description="caption mode: reorder caption matches by embedding similarity to the class's text "
        "prompts | its images | keep full-text (bm25) order; auto: text when the embedder has text, else image.")
    diversity_quality: Literal["aesthetic", "no_watermark"] | None = Field(
        None, description="diverse: add COBRA's quality term, from the corpus's aesthetic score | 1 - pwatermark.")
    diversity_quality_weight: float = Field(
        1.0, ge=0.0, le=100.0, description="diverse: weight of the quality term against coverage.")
    oversample: float = Field(
        3.0, ge=1.0, le=100.0, description="The first search asks each query for this many times its share of N.")
    max_candidates_per_class: int = Field(
        20_000, ge=1, le=MAX_CANDIDATES,
        description="Stop widening the search when a class's queries ask for this many results.")
    nprobe: int | None = Field(
        None, ge=1, le=MAX_NPROBE, description="IVF lists probed per query (approximate indexes).")
    ef_search: int | None = Field(None, ge=1, le=MAX_NPROBE, description="HNSW efSearch per query.")
    rerank_k_factor: int | None = Field(
        None, ge=1, le=1000, description="Exact re-rank depth (x k) of lossy indexes; default: the index's tuned one.")
    batch_size: int = Field(32, ge=1, le=MAX_BATCH, description="Images per embedding batch.")
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, le=1_000_000_000,
        description="Larger dataset or corpus images are refused as decompression bombs.")

    @field_validator("templates")
    @classmethod
    def _one_placeholder(cls, templates: tuple[str, ...]) -> tuple[str, ...]:
        """Each template is filled with ``str.format(name)``: any other brace would fail mid-job."""
        for t in templates:
            rest = t.replace("{}", "", 1)
            if "{}" not in t or "{" in rest or "}" in rest:
                raise ValueError(f"template {t!r} must contain '{{}}' exactly once and no other braces")
        return templates
