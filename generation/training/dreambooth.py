"""DreamBooth (Ruiz et al. 2023) per class: LoRA on the UNet (and optionally the text encoder) or full UNet.

Follows diffusers' ``examples/dreambooth/train_dreambooth_lora.py``: peft LoRA on the attention projections,
optional prior preservation with class images the base model generated, and the result saved with
``save_lora_weights`` (``pytorch_lora_weights.safetensors``), the file ``pipe.load_lora_weights`` reads.
Full fine-tuning saves a ``unet/`` folder instead. Trainers work on copies; the pipeline is never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from retrogen.progress import CancelFn, ProgressFn

from .common import (
    TrainerConfig,
    choose_precision,
    denoising_loss,
    encode_latents,
    optimizer_step,
    run_steps,
    training_mode,
)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass(frozen=True, kw_only=True)
class DreamBoothConfig(TrainerConfig):
    instance_prompt: str  # "a photo of sks dog"
    class_prompt: str  # "a photo of dog" (prior preservation)
    rank: int = 4
    learning_rate: float = 1e-4
    train_text_encoder: bool = False
    prior_preservation: bool = False
    num_class_images: int = 8
    prior_loss_weight: float = 1.0
    full_finetune: bool = False

    def hyperparameters(self) -> dict[str, Any]:
        return self.key_fields() | {"trainer_version": 2}  # 2: LoRA initialisation seeded


def _encode_prompt(tokenizer: Any, text_encoder: Any, prompt: str, n: int) -> Any:
    ids = tokenizer([prompt] * n, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


def _lora(cfg: DreamBoothConfig, targets: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian", target_modules=targets)


def _base_copy(unet: Any) -> Any:
    """A copy of the pipeline's UNet as loaded: without the LoRA a compiled pipeline keeps loaded between classes
    for hotswapping (or the class would train on top of the last one's), and not compiled (training compiles
    nothing; the copy would otherwise carry the pipeline's compiled forward)."""
    copied = copy.deepcopy(unet)
    if getattr(copied, "peft_config", None):
        copied.delete_adapters(list(copied.peft_config))
    if getattr(copied, "_compiled_call_impl", None) is not None:  # torch's in-place Module.compile
        copied._compiled_call_impl = None
    return copied


def _trainable_copies(pipe: Any, cfg: DreamBoothConfig) -> tuple[Any, Any]:
    """(UNet, text encoder) to train: copies with LoRA adapters (trainable parts in float32), or a float32 UNet
    copy for full fine-tuning. The text encoder is the pipeline's own, frozen, unless it trains too."""
    import torch
    from diffusers.training_utils import cast_training_params

    unet = _base_copy(pipe.unet)
    # peft draws the LoRA weights' initial values from torch's global generator: seed it from the config, in a
    # forked RNG state so the caller's stream is untouched, or the same cache key trains different weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.full_finetune:
            unet.to(torch.float32).requires_grad_(True)
        else:
            unet.requires_grad_(False)
            unet.add_adapter(_lora(cfg, UNET_TARGETS))
            cast_training_params(unet, dtype=torch.float32)
        unet.train()
        text_encoder = pipe.text_encoder
        if cfg.train_text_encoder:
            text_encoder = copy.deepcopy(pipe.text_encoder).requires_grad_(False)
            text_encoder.add_adapter(_lora(cfg, TEXT_TARGETS))
            cast_training_params(text_encoder, dtype=torch.float32)
    return unet, text_encoder


def _prompt_states(pipe: Any, text_encoder: Any, cfg: DreamBoothConfig, *, with_class: bool) -> Callable[[], tuple]:
    """A function giving the (instance, class or None) prompt states for a batch: encoded every step while the
    text encoder trains, else once."""
    import torch

    bs = cfg.train_batch_size

    def encode() -> tuple[Any, Any]:
        inst = _encode_prompt(pipe.tokenizer, text_encoder, cfg.instance_prompt, bs)
        cls = _encode_prompt(pipe.tokenizer, text_encoder, cfg.class_prompt, bs) if with_class else None
        return inst, cls

    if cfg.train_text_encoder:
        return encode
    with torch.no_grad():
        fixed = encode()
    return lambda: fixed


def _save(unet: Any, text_encoder: Any, cfg: DreamBoothConfig, out_dir: Path, *, base_dtype: Any) -> dict[str, Any]:
    """Save only what trained, in the layouts diffusers' loaders read; returns the format's metadata."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if cfg.full_finetune:
        unet.to(base_dtype).save_pretrained(out_dir / "unet", safe_serialization=True)
        return {"format": "unet"}
    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    te_layers = (convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
                 if cfg.train_text_encoder else None)
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=unet_layers, text_encoder_lora_layers=te_layers,
                                              weight_name=LORA_WEIGHT_NAME)
    return {"format": "lora", "weight_name": LORA_WEIGHT_NAME}


def train_dreambooth(
    pipe: Any,
    images: list[Image.Image],
    cfg: DreamBoothConfig,
    out_dir: Path,
    *,
    class_images: list[Image.Image] | None = None,
    label: str | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> dict[str, Any]:
    """Train on ``images`` (+ ``class_images`` for prior preservation); save LoRA or UNet to ``out_dir``.

    The pipeline is never modified: training works on copies.
    """
    import torch
    from diffusers import DDPMScheduler

    # 1. Trainable copies (float32 trainable weights; the precision's autocast and loss scaling around them).
    device, base_dtype = pipe.unet.device, pipe.unet.dtype
    precision = choose_precision(device, cfg.precision)
    unet, text_encoder = _trainable_copies(pipe, cfg)
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2 if cfg.full_finetune else 0.0)
    scaler = precision.scaler()
    skipped = []

    # 2. Data: latents once; prompts once unless the text encoder trains.
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(cfg.seed)
    latents = encode_latents(pipe.vae, images, cfg.resolution, generator)
    prior = (encode_latents(pipe.vae, class_images, cfg.resolution, generator)
             if cfg.prior_preservation and class_images else None)
    prompt_states = _prompt_states(pipe, text_encoder, cfg, with_class=prior is not None)
    bs = cfg.train_batch_size

    # 3. Steps: random instance images (and mirrors), plus as many prior images when preserving the prior.
    def step(i: int) -> float:
        with precision.autocast():
            inst_h, cls_h = prompt_states()
            idx = torch.randint(0, len(latents), (bs,), generator=generator).to(device)
            loss = denoising_loss(unet, noise_scheduler, latents[idx], inst_h, generator).mean()
            if prior is not None:
                pidx = torch.randint(0, len(prior), (bs,), generator=generator).to(device)
                prior_loss = denoising_loss(unet, noise_scheduler, prior[pidx], cls_h, generator).mean()
                loss = loss + cfg.prior_loss_weight * prior_loss
        if not optimizer_step(loss, optimizer, params, scaler, max_grad_norm=1.0):
            skipped.append(i)
        return float(loss.detach())

    checkpointed = (unet, text_encoder) if cfg.train_text_encoder else (unet,)
    with training_mode(cfg, *checkpointed):
        losses = run_steps(step, cfg.num_train_steps, label=label, progress=progress, should_cancel=should_cancel)

    # 4. Save only what trained.
    return {"num_train_steps": cfg.num_train_steps, "loss_first": losses[0], "loss_last": losses[-1],
            "losses": losses, "instance_prompt": cfg.instance_prompt, "precision": precision.name,
            "skipped_steps": skipped,
            **_save(unet, text_encoder, cfg, out_dir, base_dtype=base_dtype)}
