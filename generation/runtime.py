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
    batch_size: int = 1  # images per pipeline call (the configured one, or chosen from free GPU memory)
    vae_mode: str = "full"  # "full", "sliced", "tiled" or "sliced+tiled" (large sizes)
    loaded: LoadedPipeline | None = field(default=None, repr=False)
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
        from .tuning import attention_name

        return attention_name(self.text2img.unet)

    @property
    def sdpa(self) -> bool:
        from .tuning import uses_sdpa

        return uses_sdpa(self.text2img.unet)

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
            "sdpa": self.sdpa,
            "vae_mode": self.vae_mode,
            "torch_version": torch.__version__,
            "diffusers_version": diffusers.__version__,
        }

    def oom_hint(self) -> str:
        c = self.config
        hints = [f"lower batch_size (--batch-size, now {self.batch_size})", f"or size (--size, now {self.size})"]
        if c.enable_auto_batch_size:
            hints[0] = f"drop --enable-auto-batch-size and set --batch-size below {self.batch_size}"
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


@dataclass
class LoadedPipeline:
    """A base model's pipeline as loaded (before any job's scheduler or adapters), and what a reset restores."""

    pipe: Any
    device: Any
    dtype: Any
    weights_hash: str
    base_scheduler: Any  # the model's own scheduler, from which each job's is built
    base_unet: Any  # a full-UNet DreamBooth swaps pipe.unet; a reset puts this one back
    vocab_sizes: dict[str, int]  # tokenizer name -> length: textual inversion adds tokens
    hotswap_rank: int | None = None  # LoRA hotswap enabled (compiled UNet): the highest rank it takes

    @property
    def nbytes(self) -> int:
        """Bytes of the weights and buffers of every model component (what keeping it loaded holds)."""
        return sum(module_bytes(c) for c in self.pipe.components.values())


def module_bytes(module: Any) -> int:
    import torch

    if not isinstance(module, torch.nn.Module):
        return 0
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _vocab_sizes(pipe: Any) -> dict[str, int]:
    return {name: len(tok) for name in ("tokenizer", "tokenizer_2") if (tok := getattr(pipe, name, None)) is not None}


def _place(pipe: Any, ref: ModelRef, config: GenerationConfig, device: Any) -> None:
    """Move to the device (or set up CPU offload); a CUDA OOM becomes GpuOutOfMemoryError with the fix."""
    import torch

    try:
        if config.enable_cpu_offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        hint = "pass --enable-cpu-offload" if not config.enable_cpu_offload else "use a GPU with more memory"
        raise GpuOutOfMemoryError(f"moving {ref.id} to {device}", hint + " (dtype float16 halves the weights)") from None


def load_pipeline(ref: ModelRef, config: GenerationConfig) -> LoadedPipeline:
    """Load ``ref`` as diffusers does for any user, on the configured device and dtype, with SDPA attention.

    The model folder's own components (an ``image_encoder`` included) are loaded; the safety checker is
    not, since augmentation filters images later and a blacked-out image would be a silent bad sample. With
    ``enable_compile`` the UNet is compiled in place, LoRA hotswap enabled first (see :mod:`.tuning`).
    """
    from diffusers import AutoPipelineForText2Image

    from .tuning import compile_unet, enable_hotswap, use_sdpa

    device, dtype = resolve_device(config)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if ref.family == "sd":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = AutoPipelineForText2Image.from_pretrained(str(ref.path), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    use_sdpa(pipe)
    _place(pipe, ref, config, device)
    hotswap_rank = None
    if config.enable_compile:
        hotswap_rank = enable_hotswap(pipe, config)
        compile_unet(pipe)
    return LoadedPipeline(pipe=pipe, device=device, dtype=dtype, weights_hash=weights_hash(ref.path),
                          base_scheduler=pipe.scheduler, base_unet=pipe.unet, vocab_sizes=_vocab_sizes(pipe),
                          hotswap_rank=hotswap_rank)


def make_runtime(loaded: LoadedPipeline, ref: ModelRef, config: GenerationConfig) -> Runtime:
    """A job's runtime on a loaded pipeline: its scheduler, its size, its settings."""
    from .tuning import batch_size_for, configure_vae

    pipe = loaded.pipe
    pipe.scheduler = create_scheduler(config.scheduler, loaded.base_scheduler)
    size = config.size or int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    vae_mode = configure_vae(pipe, size, config)
    batch_size = batch_size_for(loaded.device, loaded.dtype, size, ref.family, config)
    return Runtime(ref=ref, weights_hash=loaded.weights_hash, config=config, device=loaded.device,
                   dtype=loaded.dtype, text2img=pipe, size=size, batch_size=batch_size, vae_mode=vae_mode,
                   loaded=loaded)


def load_runtime(ref: ModelRef, config: GenerationConfig) -> Runtime:
    """Load ``ref`` (:func:`load_pipeline`) and make a runtime for ``config`` on it."""
    return make_runtime(load_pipeline(ref, config), ref, config)


def reset_pipeline(loaded: LoadedPipeline) -> None:
    """Take off whatever a job put on the pipeline: LoRA adapters, IP-Adapters, added tokens, a swapped UNet.

    Methods undo their own changes (``ClassPlan.release``, ``teardown``); this catches what a failed job left,
    so a cached pipeline starts every job as loaded.
    """
    pipe = loaded.pipe
    if pipe.unet is not loaded.base_unet:
        pipe.unet = loaded.base_unet
    if getattr(pipe.unet, "peft_config", None) or getattr(getattr(pipe, "text_encoder", None), "peft_config", None):
        pipe.unload_lora_weights()
    if getattr(pipe.unet.config, "encoder_hid_dim_type", None) == "ip_image_proj":  # an IP-Adapter is loaded
        pipe.unload_ip_adapter()
    for name, size in loaded.vocab_sizes.items():
        tok = getattr(pipe, name)
        if len(tok) != size:
            encoder = getattr(pipe, "text_encoder" + name.removeprefix("tokenizer"))
            pipe.unload_textual_inversion(tokenizer=tok, text_encoder=encoder)
    pipe.scheduler = loaded.base_scheduler


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
