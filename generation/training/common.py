"""What every trainer shares: image tensors, VAE latents, the denoising loss and the step loop."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from retrogen.progress import CancelFn, ProgressEvent, ProgressFn, check_cancel, emit


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """What every per-class trainer takes; each trainer's config adds its own fields."""

    num_train_steps: int = 400
    learning_rate: float
    train_batch_size: int = 1
    resolution: int = 512
    seed: int = 0


def pixels(images: list[Image.Image], size: int) -> Any:
    """Resize (shorter side) + centre-crop to ``size``, scale to [-1, 1]; each image and its mirror."""
    import torch
    from torchvision.transforms import functional as TF

    out = []
    for im in images:
        t = TF.center_crop(TF.resize(TF.to_tensor(im), size, antialias=True), [size, size]) * 2.0 - 1.0
        out += [t, TF.hflip(t)]
    return torch.stack(out)


def encode_latents(vae: Any, images: list[Image.Image], size: int, generator: Any) -> Any:
    """VAE latents (float32, scaled as the UNet expects) of the images and their mirrors, computed once."""
    import torch

    x = pixels(images, size).to(vae.device, vae.dtype)
    with torch.no_grad():
        chunks = [vae.encode(x[i : i + 8]).latent_dist.sample(generator=generator) for i in range(0, len(x), 8)]
    return torch.cat(chunks).float() * vae.config.scaling_factor


def autocast(device: Any, dtype: Any) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (frozen half weights, float32 trainable ones); nothing on the CPU."""
    import torch

    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def denoising_loss(unet: Any, noise_scheduler: Any, latents: Any, hidden: Any, generator: Any) -> Any:
    """Per-sample MSE between the UNet's prediction and its target at random timesteps (SD's training loss)."""
    import torch
    import torch.nn.functional as F

    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    t = t.to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    pred = unet(noisy.to(unet.dtype), t, hidden.to(unet.dtype)).sample.float()
    return F.mse_loss(pred, target.float(), reduction="none").mean(dim=(1, 2, 3))


def run_steps(
    step: Callable[[int], float],
    num_steps: int,
    *,
    label: str | None,
    progress: ProgressFn | None,
    should_cancel: CancelFn | None,
) -> list[float]:
    """Call ``step(i)`` ``num_steps`` times, reporting each loss as a ``train`` ProgressEvent."""
    losses: list[float] = []
    every = max(1, num_steps // 50)  # at most ~50 events per class
    for i in range(num_steps):
        check_cancel(should_cancel)
        loss = step(i)
        if not math.isfinite(loss):
            from ..errors import GenerationError

            raise GenerationError(f"training diverged at step {i + 1} (loss {loss}); lower learning_rate")
        losses.append(loss)
        if (i + 1) % every == 0 or i + 1 == num_steps:
            emit(progress, ProgressEvent("train", i + 1, num_steps, label, f"loss {loss:.4f}", {"loss": loss}))
    return losses
