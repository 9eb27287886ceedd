"""The method interface: check inputs, prepare each class (train / load adapters), release it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from retrogen.imagefolder import LabelledImage
from retrogen.progress import CancelFn, ProgressFn

from ..artifacts import ArtifactStore
from ..config import GenerationConfig
from ..errors import InvalidConfigError, MethodNeedsImagesError


@dataclass
class ClassContext:
    """What ``prepare_class`` gets besides the runtime: the class's images and where artefacts go."""

    label: str
    images: list[LabelledImage]
    store: ArtifactStore
    load_image: Callable[[LabelledImage], Any]  # -> PIL RGB, decoded safely and sized for the model
    progress: ProgressFn | None = None
    should_cancel: CancelFn | None = None


@dataclass
class ClassPlan:
    """How one class's images are made: which pipeline, prompts and init images (round-robin by index)."""

    pipeline: str  # "text2img" or "img2img"
    prompts: list[str]
    init_images: list[LabelledImage] = field(default_factory=list)
    image_kwarg: str | None = None  # "image" (img2img) or "ip_adapter_image" (variation)
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)  # extra provenance (adapter, adapter_hash, ...)
    artifact: dict[str, Any] | None = None  # summary entry for a personalisation artefact
    release: Callable[[], None] | None = None


class GenerationMethod:
    """Base class. Subclasses set the class variables and implement ``prepare_class``."""

    name: ClassVar[str] = ""
    needs_images: ClassVar[bool] = False  # conditioned on / trained from the class's images
    trains: ClassVar[bool] = False  # personalisation: per-class artefacts
    families: ClassVar[tuple[str, ...]] = ("sd", "sdxl")

    def __init__(self, config: GenerationConfig):
        self.config = config

    def check_inputs(self, by_class: dict[str, list[LabelledImage]]) -> None:
        """Before any model loads: every class needs images when the method uses them."""
        if self.needs_images:
            empty = [label for label, imgs in by_class.items() if not imgs]
            if empty or not by_class:
                raise MethodNeedsImagesError(
                    f"method {self.name!r} needs training images for every class; none for {empty or 'any class'}"
                )

    def check_model(self, family: str) -> None:
        if family not in self.families:
            raise InvalidConfigError(f"method {self.name!r} supports {', '.join(self.families)} models, not {family}")
        if self.trains and self.config.enable_cpu_offload:
            # Trainers run the UNet/VAE directly; offload hooks would leave them on the CPU.
            raise InvalidConfigError(f"method {self.name!r} trains on the GPU; drop enable_cpu_offload "
                                     "(lower train_batch_size or train_size to save memory)")

    def setup(self, runtime: Any) -> None:
        """Once per call, after the model loads (e.g. load an IP-Adapter)."""

    def prepare_class(self, runtime: Any, ctx: ClassContext) -> ClassPlan:
        raise NotImplementedError

    def teardown(self, runtime: Any) -> None:
        """Undo ``setup`` so a reused pipeline is clean."""

    def parameters(self) -> dict[str, Any]:
        """The settings this method uses, for summary.json."""
        return {}


def train_size(runtime: Any, config: GenerationConfig) -> int:
    return config.train_size or runtime.size


def artifact_path(meta: dict[str, Any]) -> Path:
    return Path(meta["path"])
