"""Methods driven by prompts alone (``prompt``) or by prompts + a class image (``img2img``, SDEdit)."""

from __future__ import annotations

from typing import Any

from ..prompts import class_prompts, expand_templates
from . import register_method
from .base import ClassContext, ClassPlan, GenerationMethod


@register_method("prompt")
class PromptMethod(GenerationMethod):
    """Text-to-image from class names through templates, an ensemble, or the user's per-class prompts."""

    def prepare_class(self, runtime: Any, ctx: ClassContext) -> ClassPlan:
        return ClassPlan("text2img", class_prompts(ctx.label, self.config))

    def parameters(self) -> dict[str, Any]:
        return {"prompt_templates": list(expand_templates(self.config.prompt_templates))}


@register_method("img2img")
class Img2ImgMethod(GenerationMethod):
    """Each image starts from one of the class's images (round-robin), noised to ``strength`` (SDEdit)."""

    needs_images = True

    def prepare_class(self, runtime: Any, ctx: ClassContext) -> ClassPlan:
        return ClassPlan("img2img", class_prompts(ctx.label, self.config), ctx.images, "image",
                         {"strength": self.config.strength})

    def parameters(self) -> dict[str, Any]:
        return {"strength": self.config.strength,
                "prompt_templates": list(expand_templates(self.config.prompt_templates))}
