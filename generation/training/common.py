"""What every trainer shares: image tensors, VAE latents, the denoising loss and the step loop."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
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
    precision: str = "auto"  # auto | fp32 | fp16 | bf16, see choose_precision
    gradient_checkpointing: bool = False
    tf32: bool = False

    def key_fields(self) -> dict[str, Any]:
        """The fields that shape the trained weights (an artefact's key): all but gradient checkpointing (it
        recomputes the same values), and the precision / TF32 options only when set, so keys made before they
        existed still match."""
        d = dataclasses.asdict(self)
        d.pop("gradient_checkpointing")
        for name, default in (("precision", "auto"), ("tf32", False)):
            if d[name] == default:
                d.pop(name)
        return d


@dataclass(frozen=True)
class Precision:
    """How a trainer computes: ``fp32``, ``bf16`` (autocast), or ``fp16`` (autocast + loss scaling).

    Trainable weights stay float32 in every mode (LoRA / embedding rows); autocast runs the frozen half-precision
    model in ``dtype``. In fp16 a ``GradScaler`` scales the loss so small gradients do not flush to zero, and skips
    a step whose gradients overflowed (inf / nan) instead of writing them into the weights.
    """

    name: str
    device_type: str

    @property
    def dtype(self) -> Any:
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.name)

    def autocast(self) -> contextlib.AbstractContextManager:
        import torch

        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> Any:
        """A ``torch.amp.GradScaler`` in fp16, else None."""
        import torch

        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


def choose_precision(device: Any, requested: str = "auto") -> Precision:
    """``auto``: fp32 on the CPU; on CUDA bf16 where the GPU computes it natively (Ampere and newer), else fp16
    with loss scaling. An explicit choice is taken as it is (fp16 / bf16 on the CPU too: autocast supports both)."""
    import torch

    if requested not in ("auto", "fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be auto, fp32, fp16 or bf16, not {requested!r}")
    if requested == "auto":
        if device.type != "cuda":
            requested = "fp32"
        else:
            requested = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return Precision(requested, device.type)


def optimizer_step(loss: Any, optimizer: Any, params: list, scaler: Any = None, *,
                   max_grad_norm: float | None = None) -> bool:
    """Backward, clip, step; with a GradScaler the loss is scaled and a step with inf / nan gradients is skipped.

    Returns whether the optimizer stepped.
    """
    import torch

    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        return True
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    before = scaler.get_scale()
    scaler.step(optimizer)  # skipped when unscale_ found inf / nan
    scaler.update()  # ...and then the scale is lowered
    return scaler.get_scale() >= before


@contextlib.contextmanager
def training_mode(cfg: TrainerConfig, *checkpointed: Any) -> Iterator[None]:
    """TF32 (``cfg.tf32``) and gradient checkpointing (``cfg.gradient_checkpointing``) on ``checkpointed``
    modules for the duration of training; both put back as they were after (a shared UNet stays as loaded)."""
    import torch

    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    switched = []
    try:
        if cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        for m in checkpointed if cfg.gradient_checkpointing else ():
            if hasattr(m, "enable_gradient_checkpointing") and not getattr(m, "is_gradient_checkpointing", False):
                m.enable_gradient_checkpointing()  # diffusers models
                switched.append(m)
            elif hasattr(m, "gradient_checkpointing_enable") and not getattr(m, "is_gradient_checkpointing", False):
                m.gradient_checkpointing_enable()  # transformers models
                switched.append(m)
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        for m in switched:
            (m.disable_gradient_checkpointing if hasattr(m, "disable_gradient_checkpointing")
             else m.gradient_checkpointing_disable)()


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
