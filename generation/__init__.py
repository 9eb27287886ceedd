"""retrogen generation package: Stable Diffusion augmentation (prompt, img2img, variation, textual
inversion, DreamBooth) with provenance for every image.

Importing it loads no torch or diffusers; they load when a model does.
"""

import retrogen  # noqa: F401  (sets OMP_WAIT_POLICY before torch/faiss load)

from .augment import augment_by_generation
from .config import GenerationConfig
from .errors import (
    GenerationError,
    GpuOutOfMemoryError,
    InvalidConfigError,
    MethodNeedsImagesError,
    ModelKindError,
    OutputExistsError,
    UnknownMethodError,
    UnknownModelError,
    UnknownSchedulerError,
)
from .methods import create_method, list_methods
from .prompts import derive_seed
from .schedulers import list_schedulers

__all__ = [
    "augment_by_generation",
    "GenerationConfig",
    "list_methods",
    "list_schedulers",
    "create_method",
    "derive_seed",
    "GenerationError",
    "GpuOutOfMemoryError",
    "InvalidConfigError",
    "MethodNeedsImagesError",
    "ModelKindError",
    "OutputExistsError",
    "UnknownMethodError",
    "UnknownModelError",
    "UnknownSchedulerError",
]
