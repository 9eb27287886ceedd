"""``GenerationConfig``: every setting of a generation request, one name for kwarg, CLI flag and JSON key.

A :class:`retrogen.config.LibraryConfig`: each field carries its default, its constraint and a one-line
description (also its ``retrogen augment generate`` help); a bad value or an unknown key raises
:class:`~retrogen.generation.errors.InvalidConfigError` naming the field. ``cli`` lists historical flag spellings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from retrogen.config import LibraryConfig

from .errors import InvalidConfigError
from .schedulers import list_schedulers


def _positive(default: int, description: str, **kwargs: Any) -> Any:
    return Field(default, ge=1, description=description, **kwargs)


def _pixels(description: str) -> Any:
    """A square side in pixels: the VAE downsamples by 8."""
    return Field(None, ge=8, multiple_of=8, description=description)


class GenerationConfig(LibraryConfig):
    """Settings shared by all methods; method-specific ones are ignored by the others."""

    error: ClassVar[type[InvalidConfigError]] = InvalidConfigError
    kind: ClassVar[str] = "generation"

    # Sampling
    num_inference_steps: int = _positive(25, "Denoising steps.", json_schema_extra={"cli": ["--steps"]})
    guidance_scale: float = Field(7.5, ge=0, description="Classifier-free guidance scale.",
                                  json_schema_extra={"cli": ["--guidance"]})
    strength: float = Field(0.5, gt=0, le=1, description="img2img (and textual-inversion with enable_img2img) "
                                                         "noise strength in (0, 1]; 1.0 ignores the init image.")
    size: int | None = _pixels("Square output side in px, a multiple of 8 (default: the model's native size).")
    batch_size: int = _positive(4, "Images per pipeline call; each still has its own seed.")
    seed: int = Field(0, description="Base seed; per-image seeds derive from (seed, label, index).")
    scheduler: str = Field("dpm++", description=f"Sampler: {', '.join(list_schedulers())} (model: the model's own).")
    # Prompts
    prompt_templates: tuple[str, ...] = Field(
        ("a photo of a {}",), min_length=1, json_schema_extra={"cli": ["--prompt-template"]},
        description="Template with {} for the class name; repeat for several; 'ensemble' for a built-in set.")
    class_names: dict[str, str] | None = Field(
        None, description="{label: name used in prompts} (CLI: a JSON file); default: the label.")
    class_prompts: dict[str, tuple[str, ...]] | None = Field(
        None, description="{label: list of prompts} replacing the templates for those classes (CLI: a JSON file).")
    negative_prompt: str | None = Field(None, description="What images should not show.")
    # Model source (hub ids only; a local folder is used as it is)
    revision: str | None = Field(None, description="Hub model: branch, tag or commit (the resolved commit is "
                                                   "recorded either way).")
    local_files_only: bool = Field(False, description="Hub model: use the local cache only, never the network.")
    # Runtime
    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda or cuda:N.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="auto (float16 on cuda, float32 on cpu), float16, bfloat16 or float32.")
    enable_cpu_offload: bool = Field(False, description="CUDA only: keep idle components on the CPU.")
    enable_compile: bool = Field(False, description="torch.compile the UNet (slow first batch, faster after); "
                                                    "LoRA adapters are hotswapped, so classes do not recompile.")
    enable_auto_batch_size: bool = Field(False, description="CUDA: choose the batch size from free GPU memory and "
                                                            "the size (up to 16) instead of batch_size.")
    vae_slicing_from: int = Field(1024, ge=8, description="Decode one image at a time (VAE slicing) from this "
                                                          "size in px up.")
    vae_tiling_from: int = Field(2048, ge=8, description="Decode in overlapping tiles (VAE tiling) from this size "
                                                         "in px up.")
    # variation (IP-Adapter)
    ip_adapter: str | None = Field(None, description="variation: local .safetensors file or org/repo/sub/file "
                                                     "(default: the model's own, else h94's).")
    ip_adapter_scale: float = Field(1.0, description="variation: 1.0 conditions on the image only; lower lets "
                                                     "the prompt steer.")
    enable_variation_prompt: bool = Field(False, description="variation: also condition on the class prompt.")
    # Personalisation (textual-inversion, dreambooth)
    num_train_steps: int = _positive(400, "Personalisation steps per class.", json_schema_extra={"cli": ["--train-steps"]})
    learning_rate: float | None = Field(None, gt=0, description="Training learning rate (default: the method's: "
                                                                "textual-inversion 5e-3, LoRA 1e-4, full 5e-6).")
    train_batch_size: int = _positive(1, "Training images per step.")
    train_size: int | None = _pixels("Training resolution, a multiple of 8 (default: size).")
    num_vectors: int = _positive(1, "textual-inversion: learned token vectors per class.")
    enable_img2img: bool = Field(False, description="textual-inversion: start from class images (DA-Fusion).")
    lora_rank: int = _positive(4, "dreambooth: LoRA rank.")
    enable_text_encoder_training: bool = Field(False, description="dreambooth: LoRA on the text encoder too.")
    enable_prior_preservation: bool = Field(False, description="dreambooth: prior-preservation loss on images "
                                                               "the base model generates.")
    num_class_images: int = _positive(8, "dreambooth: prior-preservation images generated per class.")
    prior_loss_weight: float = Field(1.0, description="dreambooth: weight of the prior-preservation loss.")
    enable_full_finetune: bool = Field(False, description="dreambooth: train the whole UNet instead of LoRA "
                                                          "(needs memory).")
    train_precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="Training precision: auto (bf16 on GPUs that support it, else fp16 with loss "
                            "scaling; fp32 on the CPU), fp32, fp16 (CUDA, loss-scaled) or bf16.")
    enable_gradient_checkpointing: bool = Field(False, description="Training: recompute activations in the "
                                                                   "backward pass (less memory, ~30% slower).")
    enable_tf32: bool = Field(False, description="Training on CUDA: TF32 matmuls/convolutions for float32 work "
                                                 "(Ampere and newer).")
    instance_token: str = Field("sks", description="dreambooth: the rare identifier bound to each class.")

    @field_validator("prompt_templates")
    @classmethod
    def _one_placeholder(cls, templates: tuple[str, ...]) -> tuple[str, ...]:
        for t in templates:
            if t != "ensemble" and t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain '{{}}' exactly once")
        return templates

    @field_validator("class_names", mode="before")
    @classmethod
    def _names_as_text(cls, names: Any) -> Any:
        return {str(k): str(v) for k, v in names.items()} if isinstance(names, Mapping) else names

    @field_validator("class_prompts", mode="before")
    @classmethod
    def _prompt_lists(cls, prompts: Any) -> Any:
        """A single prompt (a string) is a one-prompt list."""
        if not isinstance(prompts, Mapping):
            return prompts
        return {str(k): (v,) if isinstance(v, str) else v for k, v in prompts.items()}

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return device

    @field_validator("instance_token")
    @classmethod
    def _not_blank(cls, token: str) -> str:
        if not token.strip():
            raise ValueError("must not be empty")
        return token
