"""Textual Inversion (Gal et al. 2022): learn k new token embeddings for one class from its images.

Follows diffusers' ``examples/textual_inversion``: only the new rows of the text encoder's embedding table
train (the others are restored after every step), and only they are saved, as ``learned_embeds.safetensors``
(``{token: (k, dim)}``), the file ``pipe.load_textual_inversion(path, token=...)`` reads. The pipeline's own
tokenizer and text encoder are never modified: training works on copies.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from retrogen.progress import CancelFn, ProgressFn
from retrogen.prompts import TEXTUAL_INVERSION_TEMPLATES

from ..errors import GenerationError
from .common import (
    TrainerConfig,
    choose_precision,
    denoising_loss,
    encode_latents,
    optimizer_step,
    run_steps,
    training_mode,
)

WEIGHT_NAME = "learned_embeds.safetensors"


@dataclass(frozen=True, kw_only=True)
class TextualInversionConfig(TrainerConfig):
    placeholder_token: str  # e.g. "<retrogen-cat>"; extra vectors are named token_1, token_2, ...
    initializer: str  # words whose first token's embedding starts the new ones (usually the class name)
    num_vectors: int = 1
    learning_rate: float = 5e-3

    def hyperparameters(self) -> dict[str, Any]:
        """What the artefact key covers (the token name is not: it only labels the result)."""
        d = self.key_fields()
        d.pop("placeholder_token")
        return d | {"templates": list(TEXTUAL_INVERSION_TEMPLATES), "trainer_version": 1}


def token_names(token: str, num_vectors: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def _with_new_tokens(pipe: Any, cfg: TextualInversionConfig) -> tuple[Any, Any, list[str]]:
    """Copies of the tokenizer and text encoder (float32, on the UNet's device) with the placeholder tokens
    added, their rows starting as the initializer's first token."""
    import torch

    tokenizer = copy.deepcopy(pipe.tokenizer)
    text_encoder = copy.deepcopy(pipe.text_encoder).to(pipe.unet.device, torch.float32)
    tokens = token_names(cfg.placeholder_token, cfg.num_vectors)
    if tokenizer.add_tokens(tokens) != len(tokens):
        raise GenerationError(f"token {cfg.placeholder_token!r} already exists in the tokenizer; pick another")
    init_ids = (tokenizer.encode(cfg.initializer, add_special_tokens=False)
                or tokenizer.encode("object", add_special_tokens=False))
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # new rows set below
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[tokenizer.convert_tokens_to_ids(tokens)] = table[init_ids[0]].clone()
    return tokenizer, text_encoder, tokens


def train_textual_inversion(
    pipe: Any,
    images: list[Image.Image],
    cfg: TextualInversionConfig,
    out_dir: Path,
    *,
    label: str | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> dict[str, Any]:
    """Train on ``images`` with ``pipe``'s frozen UNet/VAE; save the embedding rows to ``out_dir``.

    Returns:
        Metadata for the artefact: token, vector count, losses (first / last / all).
    """
    import torch
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    # 1. Copies of what we change: the tokenizer gets new tokens, the text encoder new rows.
    device = pipe.unet.device
    tokenizer, text_encoder, tokens = _with_new_tokens(pipe, cfg)
    new_ids = tokenizer.convert_tokens_to_ids(tokens)
    table = text_encoder.get_input_embeddings().weight
    original = table.detach().clone()
    keep = torch.ones(len(tokenizer), dtype=torch.bool, device=device)
    keep[new_ids] = False

    # 2. Freeze everything but the embedding table; the UNet/VAE stay shared and frozen.
    text_encoder.eval().requires_grad_(False)
    table.requires_grad_(True)
    pipe.unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    optimizer = torch.optim.AdamW([table], lr=cfg.learning_rate, weight_decay=0.0)
    precision = choose_precision(device, cfg.precision)
    scaler = precision.scaler()
    skipped = []
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(cfg.seed)
    latents = encode_latents(pipe.vae, images, cfg.resolution, generator)
    subject = " ".join(tokens)

    # 3. Steps: random images (and mirrors) with random templates.
    def step(i: int) -> float:
        idx = torch.randint(0, len(latents), (cfg.train_batch_size,), generator=generator)
        picks = torch.randint(0, len(TEXTUAL_INVERSION_TEMPLATES), (len(idx),), generator=generator)
        prompts = [TEXTUAL_INVERSION_TEMPLATES[int(j)].format(subject) for j in picks]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        with precision.autocast():
            hidden = text_encoder(ids)[0]
            loss = denoising_loss(pipe.unet, noise_scheduler, latents[idx.to(device)], hidden, generator).mean()
        if not optimizer_step(loss, optimizer, [table], scaler):
            skipped.append(i)
        with torch.no_grad():  # only the new rows learn
            table[keep] = original[keep]
        return float(loss.detach())

    with training_mode(cfg, pipe.unet):  # the shared UNet is put back as it was
        losses = run_steps(step, cfg.num_train_steps, label=label, progress=progress, should_cancel=should_cancel)

    # 4. Save only the learned rows, in the layout load_textual_inversion reads.
    learned = table.detach()[new_ids].to("cpu", torch.float32).contiguous()
    save_file({cfg.placeholder_token: learned}, str(out_dir / WEIGHT_NAME))
    return {"weight_name": WEIGHT_NAME, "token": cfg.placeholder_token, "num_vectors": cfg.num_vectors,
            "num_train_steps": cfg.num_train_steps, "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
            "precision": precision.name, "skipped_steps": skipped}
