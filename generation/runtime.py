"""Loading a base model into ready pipelines on the right device, dtype and scheduler."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .config import GenerationConfig
from .errors import GpuOutOfMemoryError, InvalidConfigError
from .models import ModelRef, weights_hash
from .schedulers import create_scheduler


@dataclass
class Runtime:
    """A loaded base model: the text-to-image pipeline, and an image-to-image view sharing its components."""

    ref: ModelRef
    weights_hash: str
    config: GenerationConfig
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    text2img: Any  # diffusers pipeline
    size: int
    _img2img: Any = field(default=None, repr=False)

    @property
    def img2img(self) -> Any:
        if self._img2img is None:
            from diffusers import AutoPipelineForImage2Image

            self._img2img = AutoPipelineForImage2Image.from_pipe(self.text2img)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    @property
    def attention(self) -> str:
        procs = self.text2img.unet.attn_processors
        return type(next(iter(procs.values()))).__name__ if procs else "none"

    def provenance(self) -> dict[str, Any]:
        """Fields every generated image's record shares: enough to find the exact model and software again.

        ``model`` is as the user named it (a hub id, or a folder maybe relative); ``model_path`` is the absolute
        folder the weights were read from, and ``model_revision`` the hub commit (None for a local folder).
        """
        import diffusers
        import torch

        return {
            "model": self.ref.id,
            "model_revision": self.ref.revision,
            "model_path": str(self.ref.path),
            "weights_hash": self.weights_hash,
            "device": self.device.type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention": self.attention,
            "torch_version": torch.__version__,
            "diffusers_version": diffusers.__version__,
        }

    def oom_hint(self) -> str:
        c = self.config
        hints = [f"lower batch_size (--batch-size, now {c.batch_size})", f"or size (--size, now {self.size})"]
        if not c.enable_cpu_offload:
            hints.append("or pass --enable-cpu-offload")
        return ", ".join(hints)


def resolve_device(config: GenerationConfig) -> tuple[Any, Any]:
    import torch

    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidConfigError(f"device={config.device!r} but CUDA is not available here; use device='cpu'")
    if config.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, config.dtype)
    if dtype == torch.float16 and device.type == "cpu":
        raise InvalidConfigError("dtype='float16' needs CUDA; use bfloat16 or float32 on the CPU")
    if config.enable_cpu_offload and device.type != "cuda":
        raise InvalidConfigError("enable_cpu_offload needs a CUDA device")
    return device, dtype


def load_runtime(ref: ModelRef, config: GenerationConfig) -> Runtime:
    """Load ``ref`` as diffusers does for any user, then set scheduler, device and options.

    The model folder's own components (an ``image_encoder`` included) are loaded; the safety checker is
    not, since augmentation filters images later and a blacked-out image would be a silent bad sample.
    """
    from diffusers import AutoPipelineForText2Image

    device, dtype = resolve_device(config)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if ref.family == "sd":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    import torch

    pipe = AutoPipelineForText2Image.from_pretrained(str(ref.path), **kwargs)
    pipe.scheduler = create_scheduler(config.scheduler, pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cuda":
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())  # SDPA (flash / memory-efficient kernels)
    try:
        if config.enable_cpu_offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        hint = "pass --enable-cpu-offload" if not config.enable_cpu_offload else "use a GPU with more memory"
        raise GpuOutOfMemoryError(f"moving {ref.id} to {device}", hint + " (dtype float16 halves the weights)") from None
    if config.enable_compile:
        pipe.unet.compile()  # in place: the module keeps its type, so adapters can still be loaded
    size = config.size or int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    return Runtime(ref=ref, weights_hash=weights_hash(ref.path), config=config, device=device, dtype=dtype,
                   text2img=pipe, size=size)


@contextlib.contextmanager
def oom_guard(runtime: Runtime, during: str) -> Iterator[None]:
    """Turn CUDA OOM into GpuOutOfMemoryError with the settings to lower, and free the cache."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise GpuOutOfMemoryError(during, runtime.oom_hint()) from None
