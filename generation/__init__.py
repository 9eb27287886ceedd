"""retrogen generation: Stable Diffusion augmentation (prompt, img2img, variation, textual inversion,
DreamBooth) with provenance for every image.

Public names load lazily; importing the package loads no torch or diffusers (they load when a model does).
"""

from retrogen.lazy import lazy_exports, require_namespace

require_namespace(__name__, "retrogen.generation")

_EXPORTS = {
    "augment_by_generation": ".augment",
    "GenerationConfig": ".config",
    "list_methods": ".methods",
    "create_method": ".methods",
    "list_schedulers": ".schedulers",
    "derive_seed": ".prompts",
    **{name: ".errors" for name in (
        "GenerationError", "GpuOutOfMemoryError", "InvalidConfigError", "MethodNeedsImagesError", "ModelKindError",
        "OutputExistsError", "UnknownMethodError", "UnknownModelError", "UnknownSchedulerError")},
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
