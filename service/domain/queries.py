"""A synchronous query's bounds and images, decoded within the server's limits (``/v1/retrieve``, ``/knn-service``)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from retrogen.errors import InvalidInputError
from retrogen.imageio import decode_image

from ..core.config import Settings

if TYPE_CHECKING:
    from retrogen.retrieval.safety import ItemScreen

    from .indexes import LoadedIndex


@dataclass(frozen=True)
class QueryLimits:
    """Bounds on one synchronous query request; the service Settings set each by the same name."""

    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 16 * 1024 * 1024
    max_queries: int = 32
    max_k: int = 1000
    safety_classifiers: tuple[str, ...] = ()  # importable classifiers the operator allows, besides built-ins

    @classmethod
    def from_settings(cls, settings: Settings) -> QueryLimits:
        return cls(settings.max_image_pixels, settings.max_image_bytes, settings.max_queries, settings.max_k,
                   tuple(settings.safety_classifiers))


def check_classifier_allowed(spec: str | None, operator_allowed: tuple[str, ...] | list[str], *, what: str) -> None:
    """A request may name a built-in safety classifier or one the operator listed; importing code is never a
    request's choice (``package.module:factory`` runs that module)."""
    from retrogen.retrieval.safety import BUILTIN_CLASSIFIERS

    allowed = set(BUILTIN_CLASSIFIERS) | set(operator_allowed)
    if spec is not None and spec not in allowed:
        raise InvalidInputError(f"{what} {spec!r} is not offered here; choose one of {', '.join(sorted(allowed))}")


def decode_base64_image(data: str, *, what: str, limits: QueryLimits) -> tuple[Image.Image, bytes]:
    """A base64 string (optionally a ``data:image/...;base64,`` URL) -> (RGB PIL image, the decoded bytes).

    Raises:
        InvalidInputError: not base64, too large, or not a safe decodable image (the message names ``what``).
    """
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if ";base64" not in header:
            raise InvalidInputError(f"{what}: a data URL must be base64-encoded")
    if len(data) > (limits.max_image_bytes * 4) // 3 + 4:
        raise InvalidInputError(f"{what}: image is larger than {limits.max_image_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInputError(f"{what}: not valid base64 ({e})") from None
    try:
        return decode_image(raw, max_pixels=limits.max_image_pixels, max_bytes=limits.max_image_bytes), raw
    except InvalidInputError as e:
        raise InvalidInputError(f"{what}: {e}") from None


#: the RetrievalConfig fields a synchronous query may set to screen its results (opt-out, safety)
SCREEN_FIELDS = ("opt_out", "respect_corpus_opt_out", "max_punsafe", "max_pwatermark", "nsfw_exclude",
                 "safety_classifier", "safety_threshold")


def query_screen(loaded: LoadedIndex, limits: QueryLimits, fields: dict[str, Any]) -> ItemScreen | None:
    """The screen a query's ``SCREEN_FIELDS`` ask for on ``loaded`` (classifiers from its cache), or None when
    it would remove nothing (then the plain search runs)."""
    from retrogen.retrieval import RetrievalConfig
    from retrogen.retrieval.safety import screen_for

    check_classifier_allowed(fields.get("safety_classifier"), limits.safety_classifiers, what="safety_classifier")
    config = RetrievalConfig.from_dict({k: v for k, v in fields.items() if k in SCREEN_FIELDS})
    screen = screen_for(config, loaded.corpus.manifest, loaded.embedder, load=lambda spec, _: loaded.classifier(spec))
    return screen if screen else None


#: clip-retrieval drops an item when its safety model's NSFW probability is 0.5 or more
CLIP_RETRIEVAL_SAFETY_THRESHOLD = 0.5


def clip_client_screen(loaded: LoadedIndex, *, use_safety_model: bool, use_violence_detector: bool,
                       safety_classifier: str | None) -> tuple[ItemScreen | None, list[str]]:
    """What ClipClient's flags ask for, as this index can serve them, and the flags it cannot serve.

    ``use_safety_model``: the corpus's punsafe scores when it has them, else the index's configured
    ``safety_classifier``; ``use_violence_detector``: the zero-shot violence detector (an image-text embedder).
    The corpus's own opt-out flags are always honoured.
    """
    from retrogen.retrieval.safety import AnyOf, ItemScreen, SafetyThresholds

    manifest, unavailable, classifiers = loaded.corpus.manifest, [], []
    max_punsafe = None
    if use_safety_model:
        if manifest.has_column("punsafe"):
            max_punsafe = CLIP_RETRIEVAL_SAFETY_THRESHOLD
        elif safety_classifier:
            classifiers.append(loaded.classifier(safety_classifier))
        else:
            unavailable.append("use_safety_model")
    if use_violence_detector:
        if loaded.embedder.supports_text:
            classifiers.append(loaded.classifier("zero-shot:violence"))
        else:
            unavailable.append("use_violence_detector")
    # punsafe is a probability of "unsafe": strictly above 0.5 is dropped, as the classifier drops >= 0.5
    thresholds = SafetyThresholds(max_punsafe=max_punsafe, classifier_threshold=CLIP_RETRIEVAL_SAFETY_THRESHOLD,
                                  respect_corpus_opt_out=manifest.has_column("opt_out"))
    classifier = classifiers[0] if len(classifiers) == 1 else AnyOf(tuple(classifiers)) if classifiers else None
    screen = ItemScreen(thresholds, classifier=classifier)
    return (screen if screen else None), unavailable
