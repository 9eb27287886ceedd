"""Which corpus items must not be returned, and why: opt-outs, unsafe and watermarked images.

Three sources of evidence, each optional:

- the user's opt-out list (:class:`~retrogen.retrieval.opt_out.OptOut`) and the corpus's own ``opt_out`` flag;
- the corpus's metadata scores (LAION's ``punsafe`` and ``pwatermark``, its ``NSFW`` tag), compared with
  thresholds; an item with no score is kept and counted as unscored;
- a pluggable classifier of unsafe images (:func:`load_classifier`), run on the candidates' stored
  embeddings or decoded images.

:class:`ItemScreen` answers, for candidate ids, the reason each one is excluded (a name of
``selection.FILTERS``); the selection policy then skips them as it skips every other filtered item.
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from retrogen.errors import InvalidInputError
from retrogen.imageio import DEFAULT_MAX_PIXELS, decode_image

from .opt_out import OptOut

if TYPE_CHECKING:
    from PIL import Image

    from .config import RetrievalConfig
    from .embedders import Embedder
    from .index import CorpusIndex
    from .index_directory import Manifest

#: clip-retrieval's violence detector, as a zero-shot choice between a neutral and a violent description
VIOLENCE_PROMPTS = ("an image", "a violent picture, with blood, weapons or fighting")
NSFW_PROMPTS = ("an image", "an explicit, pornographic picture")


@runtime_checkable
class ItemClassifier(Protocol):
    """Scores how likely each item is unsafe, in [0, 1]. ``needs_images``: called with decoded images
    (else with None); ``embeddings`` are always the items' stored, normalised vectors."""

    name: str
    needs_images: bool

    def __call__(self, embeddings: np.ndarray, images: Sequence[Image.Image] | None) -> np.ndarray: ...


@dataclass(frozen=True)
class ZeroShotDetector:
    """An item is unsafe when its embedding is closer to the second prompt than to the first (clip-retrieval's
    violence detector works this way); the score is the softmax of the two cosines at CLIP's scale 100."""

    name: str
    prompt_vectors: np.ndarray  # (2, dim): neutral, unsafe
    needs_images: bool = False

    def __call__(self, embeddings: np.ndarray, images: Sequence[Image.Image] | None = None) -> np.ndarray:
        logits = 100.0 * embeddings.astype(np.float32) @ self.prompt_vectors.T
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p[:, 1] / p.sum(axis=1)


def zero_shot_detector(name: str, prompts: Sequence[str], embedder: Embedder) -> ZeroShotDetector:
    if not embedder.supports_text:
        raise InvalidInputError(f"the {name} detector compares images with text; the index's embedder "
                                f"{embedder.name!r} is image-only")
    return ZeroShotDetector(name, embedder.embed_texts(list(prompts)).astype(np.float32))


@dataclass(frozen=True)
class AnyOf:
    """Several classifiers as one: an item's score is the highest any of them gives it."""

    parts: tuple[ItemClassifier, ...]

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.parts)

    @property
    def needs_images(self) -> bool:
        return any(p.needs_images for p in self.parts)

    def __call__(self, embeddings: np.ndarray, images: Sequence[Image.Image] | None = None) -> np.ndarray:
        return np.max([np.asarray(p(embeddings, images if p.needs_images else None), np.float64).ravel()
                       for p in self.parts], axis=0)


#: built-in classifiers by name; anything else is ``package.module:factory``
BUILTIN_CLASSIFIERS: dict[str, Callable[[Embedder], ItemClassifier]] = {
    "zero-shot:violence": lambda e: zero_shot_detector("zero-shot:violence", VIOLENCE_PROMPTS, e),
    "zero-shot:nsfw": lambda e: zero_shot_detector("zero-shot:nsfw", NSFW_PROMPTS, e),
}


def load_classifier(spec: str, embedder: Embedder) -> ItemClassifier:
    """A built-in name, or ``package.module:factory`` where ``factory(embedder)`` returns an ItemClassifier."""
    if spec in BUILTIN_CLASSIFIERS:
        return BUILTIN_CLASSIFIERS[spec](embedder)
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InvalidInputError(f"safety_classifier {spec!r}: give one of {', '.join(BUILTIN_CLASSIFIERS)} or "
                                "package.module:factory")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise InvalidInputError(f"safety_classifier {spec!r} cannot be loaded: {e}") from None
    classifier = factory(embedder)
    if not isinstance(classifier, ItemClassifier):
        raise InvalidInputError(f"safety_classifier {spec!r}: {attr}(embedder) must return an object with "
                                "name, needs_images and __call__(embeddings, images)")
    return classifier


@dataclass(frozen=True)
class SafetyThresholds:
    """What the metadata and the classifier must show for an item to be kept (None: not checked)."""

    max_punsafe: float | None = None
    max_pwatermark: float | None = None
    nsfw_exclude: frozenset[str] = frozenset()  # NSFW tags (upper-cased) that exclude an item
    classifier_threshold: float = 0.5
    respect_corpus_opt_out: bool = True

    def metadata_columns(self) -> list[str]:
        wanted = {"punsafe": self.max_punsafe is not None, "pwatermark": self.max_pwatermark is not None,
                  "nsfw": bool(self.nsfw_exclude), "opt_out": self.respect_corpus_opt_out}
        return [name for name, on in wanted.items() if on]


@dataclass
class ItemScreen:
    """Screens candidate ids against the opt-out list, metadata thresholds and classifier; remembers verdicts."""

    thresholds: SafetyThresholds
    opt_out: OptOut = field(default_factory=lambda: OptOut.parse(()))
    classifier: ItemClassifier | None = None
    verdicts: dict[int, str | None] = field(default_factory=dict)  # id -> reason excluded, or None (kept)
    scores: dict[int, float] = field(default_factory=dict)  # id -> classifier score
    unscored: Counter = field(default_factory=Counter)  # column -> screened items with no value in it
    by_source: Counter = field(default_factory=Counter)  # "user_list" | "corpus_flag" -> distinct items opted out

    def __bool__(self) -> bool:
        return bool(self.opt_out or self.classifier or self.thresholds.metadata_columns())

    def excluded(self, ids: Sequence[int], *, metadata: Callable[[list[int], list[str]], list[dict[str, Any]]],
                 embeddings: Callable[[list[int]], np.ndarray],
                 images: Callable[[list[int]], list[Image.Image]]) -> dict[int, str]:
        """Reason each excluded id is excluded, among ``ids`` (verdicts already given are reused)."""
        new = [int(i) for i in ids if int(i) not in self.verdicts]
        if new and self:
            self._screen(new, metadata=metadata, embeddings=embeddings, images=images)
        else:
            self.verdicts.update(dict.fromkeys(new))
        return {int(i): self.verdicts[int(i)] for i in ids if self.verdicts.get(int(i))}

    def excluded_in(self, corpus: CorpusIndex, ids: Sequence[int], *,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[int, str]:
        """:meth:`excluded` for rows of ``corpus``: its metadata, stored vectors and (for an image classifier)
        its images, decoded within ``max_pixels``."""
        return self.excluded(
            ids, metadata=lambda i, cols: corpus.metadata(i, columns=cols),
            embeddings=lambda i: corpus.embeddings(i).astype(np.float32),
            images=lambda i: [decode_image(corpus.read_bytes(x), max_pixels=max_pixels) for x in i])

    def _screen(self, ids: list[int], *, metadata, embeddings, images) -> None:
        t = self.thresholds
        columns = ["id", "url", "sha256"] + t.metadata_columns()
        rows = metadata(ids, columns)
        need_classifier = []
        for row in rows:
            reason = self._metadata_reason(row)
            self.verdicts[int(row["id"])] = reason
            if reason is None and self.classifier is not None:
                need_classifier.append(int(row["id"]))
        if need_classifier:
            scores = np.asarray(self.classifier(embeddings(need_classifier),
                                                images(need_classifier) if self.classifier.needs_images else None),
                                dtype=np.float64).ravel()
            if len(scores) != len(need_classifier):
                raise InvalidInputError(f"safety classifier {self.classifier.name!r} returned {len(scores)} "
                                        f"scores for {len(need_classifier)} items")
            for i, s in zip(need_classifier, scores, strict=True):
                self.scores[i] = round(float(s), 6)
                if not s < t.classifier_threshold:  # NaN counts as unsafe
                    self.verdicts[i] = "unsafe"

    def _metadata_reason(self, row: dict[str, Any]) -> str | None:
        t = self.thresholds
        if self.opt_out and self.opt_out.matches(row.get("url"), row.get("sha256")):
            self.by_source["user_list"] += 1
            return "opt_out"
        if t.respect_corpus_opt_out and row.get("opt_out"):
            self.by_source["corpus_flag"] += 1
            return "opt_out"
        for column, limit in (("punsafe", t.max_punsafe), ("pwatermark", t.max_pwatermark)):
            if limit is None:
                continue
            value = row.get(column)
            if value is None or value != value:
                self.unscored[column] += 1
            elif np.float32(value) > np.float32(limit):  # scores are stored as float32: compare as such
                return "unsafe" if column == "punsafe" else "watermark"
        if t.nsfw_exclude:
            tag = row.get("nsfw")
            if tag is None:
                self.unscored["nsfw"] += 1
            elif str(tag).strip().upper() in t.nsfw_exclude:
                return "unsafe"
        return None

    def report(self) -> dict[str, Any]:
        """What ``summary.json`` records under ``screening``. Counts here are of distinct items screened; the
        summary's ``removed`` counts each time a class's walk skipped one (an item several classes found counts
        once per class)."""
        t = self.thresholds
        return {
            "opt_out": {"entries": len(self.opt_out.urls) + len(self.opt_out.hashes) + len(self.opt_out.domains),
                        "respect_corpus_flag": t.respect_corpus_opt_out, "items": dict(self.by_source)},
            "max_punsafe": t.max_punsafe, "max_pwatermark": t.max_pwatermark,
            "nsfw_exclude": sorted(t.nsfw_exclude),
            "classifier": self.classifier.name if self.classifier else None,
            "classifier_threshold": t.classifier_threshold if self.classifier else None,
            "classified": len(self.scores),
            "unscored_candidates": dict(self.unscored),
        }


def screen_for(config: RetrievalConfig, manifest: Manifest, embedder: Embedder, *,
               load: Callable[[str, Embedder], ItemClassifier] = load_classifier) -> ItemScreen:
    """The opt-out / safety screen ``config`` asks for, on the index of ``manifest``; refuses thresholds on
    scores the corpus does not have. ``load`` builds the classifier (the service passes its cache)."""
    check_columns(config, manifest)
    thresholds = SafetyThresholds(max_punsafe=config.max_punsafe, max_pwatermark=config.max_pwatermark,
                                  nsfw_exclude=frozenset(t.strip().upper() for t in config.nsfw_exclude),
                                  classifier_threshold=config.safety_threshold,
                                  respect_corpus_opt_out=config.respect_corpus_opt_out
                                  and manifest.has_column("opt_out"))
    classifier = load(config.safety_classifier, embedder) if config.safety_classifier else None
    return ItemScreen(thresholds, OptOut.parse(config.opt_out), classifier)


def check_columns(config: RetrievalConfig, manifest: Manifest) -> None:
    """Refuse thresholds (and a diverse quality term) on metadata scores the index's corpus does not have."""
    quality = config.diversity_quality if config.selection == "diverse" else None
    needs = [("punsafe", config.max_punsafe is not None), ("pwatermark", config.max_pwatermark is not None),
             ("nsfw", bool(config.nsfw_exclude)), ("aesthetic", quality == "aesthetic"),
             ("pwatermark", quality == "no_watermark")]
    for column, needed in needs:
        if needed and not manifest.has_column(column):
            raise InvalidInputError(
                f"this request needs the corpus's {column!r} scores; index {manifest.index_id!r} "
                f"has none (its metadata carried no such column, or it was built before they were recorded: "
                "`retrogen index captions DIR` counts them)")
