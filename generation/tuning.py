"""Keeping a GPU busy: batch size from free memory, VAE slicing / tiling at large sizes, SDPA attention, and
``torch.compile`` with LoRA hotswap so personalised classes do not recompile the UNet.

Nothing here changes images on the CPU at the default settings: the batch size is the configured one unless
``enable_auto_batch_size`` (CUDA only), VAE slicing starts at ``vae_slicing_from`` px (1024) and tiling at
``vae_tiling_from`` px (2048), both above the sizes the tests use.
"""

from __future__ import annotations

from typing import Any

from .config import GenerationConfig

GIB = 1 << 30
#: Peak activation memory of one image at 512 px in half precision (UNet with classifier-free guidance, so two
#: samples, plus its share of the VAE decode), measured as an upper bound on SD 1.5; other sizes scale with
#: the pixel count, float32 doubles it, SDXL's wider UNet and its float32 VAE upcast take 1.5x.
BYTES_PER_IMAGE_512 = int(1.5 * GIB)
FAMILY_FACTOR = {"sd": 1.0, "sdxl": 1.5}
RESERVE_BYTES = 2 * GIB  # left free for the allocator, cuDNN workspaces and the CUDA context
RESERVE_FRACTION = 0.1
MAX_AUTO_BATCH = 16  # beyond this the GPU is saturated and latency per batch only grows
SDPA_PROCESSORS = ("AttnProcessor2_0", "IPAdapterAttnProcessor2_0", "FusedAttnProcessor2_0")


def bytes_per_image(size: int, *, family: str = "sd", dtype_bytes: int = 2) -> int:
    """Estimated peak GPU memory one more image in a batch costs at ``size`` px."""
    return int(BYTES_PER_IMAGE_512 * (size / 512) ** 2 * FAMILY_FACTOR.get(family, 1.5) * dtype_bytes / 2)


def choose_batch_size(size: int, *, family: str = "sd", dtype_bytes: int = 2, device: Any = None,
                      max_batch: int = MAX_AUTO_BATCH) -> int:
    """The batch size that fits the free memory of CUDA ``device`` (``torch.cuda.mem_get_info``) at ``size``.

    What is free now, less a reserve (2 GiB or 10 %, the larger), divided by :func:`bytes_per_image`; at least
    1, at most ``max_batch``. Call it once the pipeline is on the device, so its weights are not counted free.
    """
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    usable = free - max(RESERVE_BYTES, int(RESERVE_FRACTION * free))
    fits = usable // bytes_per_image(size, family=family, dtype_bytes=dtype_bytes)
    return int(max(1, min(max_batch, fits)))


def batch_size_for(runtime_device: Any, dtype: Any, size: int, family: str, config: GenerationConfig) -> int:
    """The batch size a job uses: chosen from free memory with ``enable_auto_batch_size`` on CUDA, else the
    configured one."""
    if not (config.enable_auto_batch_size and runtime_device.type == "cuda"):
        return config.batch_size
    import torch

    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    return choose_batch_size(size, family=family, dtype_bytes=dtype_bytes, device=runtime_device)


def configure_vae(pipe: Any, size: int, config: GenerationConfig) -> str:
    """Slice the VAE decode (one image at a time) from ``vae_slicing_from`` px, tile it from
    ``vae_tiling_from`` px, neither below; returns the mode (recorded in provenance). Set per job, since a
    cached pipeline keeps the last job's setting."""
    vae = pipe.vae
    mode = "full"
    if size >= config.vae_slicing_from:
        vae.enable_slicing()
        mode = "sliced"
    else:
        vae.disable_slicing()
    if size >= config.vae_tiling_from:
        vae.enable_tiling()
        mode = "tiled" if mode == "full" else "sliced+tiled"
    else:
        vae.disable_tiling()
    return mode


def use_sdpa(pipe: Any) -> str:
    """PyTorch 2's scaled-dot-product attention (flash / memory-efficient kernels) on the UNet; diffusers'
    default processor already uses it, so this only replaces a processor that does not. Returns the name."""
    procs = pipe.unet.attn_processors
    names = {type(p).__name__ for p in procs.values()}
    if names and not names <= set(SDPA_PROCESSORS):
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())
    return attention_name(pipe.unet)


def attention_name(unet: Any) -> str:
    """The UNet's attention processor class (provenance's ``attention``)."""
    procs = unet.attn_processors
    return type(next(iter(procs.values()))).__name__ if procs else "none"


def uses_sdpa(unet: Any) -> bool:
    """Whether every attention processor runs PyTorch's scaled-dot-product attention (provenance's ``sdpa``)."""
    procs = unet.attn_processors
    return bool(procs) and all(type(p).__name__ in SDPA_PROCESSORS for p in procs.values())


def enable_hotswap(pipe: Any, config: GenerationConfig) -> int | None:
    """Before the UNet is compiled: let later LoRA loads swap weights in place (``hotswap=True``) up to rank
    ``lora_rank``, so a compiled UNet is not recompiled per class. None when the pipeline has no LoRA loader."""
    if not hasattr(pipe, "enable_lora_hotswap"):
        return None
    # "ignore": peft refuses to prepare an already compiled model, but ``Module.compile`` is lazy (nothing is
    # traced before the first call), so the first class's LoRA is in the first graph; on a cached pipeline whose
    # UNet already ran without one, that first LoRA costs one recompile per job, the next classes' none.
    pipe.enable_lora_hotswap(target_rank=config.lora_rank, check_compiled="ignore")
    return config.lora_rank


def compile_unet(pipe: Any, **compile_kwargs: Any) -> None:
    """``torch.compile`` the UNet in place (the module keeps its type and identity, so adapters still load)."""
    pipe.unet.compile(**compile_kwargs)


def load_lora(pipe: Any, path: str, weight_name: str, *, hotswap_rank: int | None, adapter_name: str) -> bool:
    """Load a LoRA into the pipeline; with hotswap enabled and one already loaded, swap its weights in place
    (no new modules, so a compiled UNet keeps its graph). Returns whether it was hotswapped.

    Hotswap keeps a single adapter slot (``HOTSWAP_ADAPTER``) loaded between classes: unloading it would
    remove the LoRA layers and recompile; ``reset_pipeline`` / the method's teardown unload it at the end.
    """
    if hotswap_rank is None:
        pipe.load_lora_weights(path, weight_name=weight_name, adapter_name=adapter_name)
        return False
    loaded = HOTSWAP_ADAPTER in (getattr(pipe.unet, "peft_config", None) or {})
    pipe.load_lora_weights(path, weight_name=weight_name, adapter_name=HOTSWAP_ADAPTER, hotswap=loaded)
    return loaded


HOTSWAP_ADAPTER = "rg_hotswap"
