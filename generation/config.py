"""``GenerationConfig``: every setting of a generation request, one name for kwarg, CLI flag and JSON."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidConfigError

DTYPES = ("auto", "float16", "bfloat16", "float32")


@dataclass(frozen=True)
class GenerationConfig:
    """Settings shared by all methods; method-specific ones are ignored by the others."""

    # Sampling
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    strength: float = 0.5  # img2img (and textual-inversion with enable_img2img): 1.0 ignores the init image
    size: int | None = None  # square output side in px; None: the model's native size
    batch_size: int = 4  # images per pipeline call; each still has its own seed
    seed: int = 0  # base seed; image seeds derive from (seed, label, index)
    scheduler: str = "dpm++"  # see generation.list_schedulers()
    # Prompts
    prompt_templates: tuple[str, ...] = ("a photo of a {}",)  # "{}" is the class name; "ensemble" expands
    class_names: Mapping[str, str] | None = None  # label -> name used in prompts (default: the label)
    class_prompts: Mapping[str, tuple[str, ...]] | None = None  # label -> own prompts (replace templates)
    negative_prompt: str | None = None
    # Model source (hub ids only; a local folder is used as it is)
    revision: str | None = None  # hub branch, tag or commit; the resolved commit is recorded either way
    local_files_only: bool = False  # use the hub cache only, never the network
    # Runtime
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: float16 on cuda, float32 on cpu
    enable_cpu_offload: bool = False  # CUDA only: keep idle components on the CPU
    enable_compile: bool = False  # torch.compile the UNet (slow first batch, faster after)
    # variation (IP-Adapter)
    ip_adapter: str | None = None  # local .safetensors file or "org/repo/subfolder/file"; None: model's own or h94's
    ip_adapter_scale: float = 1.0  # 1.0: image only; lower lets the prompt steer
    enable_variation_prompt: bool = False  # also condition variations on the class prompt
    # Personalisation (textual-inversion, dreambooth)
    num_train_steps: int = 400
    learning_rate: float | None = None  # None: the method's default (TI 5e-3, LoRA 1e-4, full 5e-6)
    train_batch_size: int = 1
    train_size: int | None = None  # training resolution; None: size
    num_vectors: int = 1  # textual-inversion: learned token vectors per class
    enable_img2img: bool = False  # textual-inversion: start from a class image (DA-Fusion)
    lora_rank: int = 4
    enable_text_encoder_training: bool = False  # dreambooth: LoRA on the text encoder too
    enable_prior_preservation: bool = False
    num_class_images: int = 8  # prior-preservation images generated per class
    prior_loss_weight: float = 1.0
    enable_full_finetune: bool = False  # dreambooth: train the whole UNet instead of LoRA (needs memory)
    instance_token: str = "sks"  # dreambooth's rare identifier

    def __post_init__(self) -> None:
        # Normalise JSON lists to tuples so configs compare and hash the same however they were built.
        object.__setattr__(self, "prompt_templates", tuple(self.prompt_templates))
        if self.class_prompts is not None:
            cp = {str(k): (v,) if isinstance(v, str) else tuple(v) for k, v in self.class_prompts.items()}
            object.__setattr__(self, "class_prompts", cp)
        if self.class_names is not None:
            object.__setattr__(self, "class_names", {str(k): str(v) for k, v in self.class_names.items()})
        self.validate()

    def validate(self) -> None:
        """Raises InvalidConfigError naming the first bad setting."""

        def bad(name: str, why: str) -> InvalidConfigError:
            return InvalidConfigError(f"{name}={getattr(self, name)!r}: {why}")

        for name in ("num_inference_steps", "batch_size", "num_train_steps", "train_batch_size", "num_vectors",
                     "lora_rank", "num_class_images"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "must be a positive integer")
        if not 0.0 < self.strength <= 1.0:
            raise bad("strength", "must be in (0, 1]")
        if self.guidance_scale < 0:
            raise bad("guidance_scale", "must be >= 0")
        for name in ("size", "train_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 8 or v % 8):
                raise bad(name, "must be a multiple of 8 (pixels)")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"must be one of {', '.join(DTYPES)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise bad("device", "must be auto, cpu, cuda or cuda:N")
        if not self.prompt_templates:
            raise bad("prompt_templates", "needs at least one template")
        for t in self.prompt_templates:
            if t != "ensemble" and t.count("{}") != 1:
                raise bad("prompt_templates", f"template {t!r} must contain '{{}}' exactly once")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise bad("learning_rate", "must be > 0")
        if not self.instance_token.strip():
            raise bad("instance_token", "must not be empty")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["prompt_templates"] = list(self.prompt_templates)
        if self.class_prompts is not None:
            d["class_prompts"] = {k: list(v) for k, v in self.class_prompts.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GenerationConfig:
        """Build from JSON; unknown keys are an error listing the valid ones."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise InvalidConfigError(f"unknown generation setting(s) {unknown}; valid: {', '.join(sorted(valid))}")
        try:
            return cls(**d)
        except TypeError as e:
            raise InvalidConfigError(f"bad generation settings: {e}") from None

    def replace(self, **changes: Any) -> GenerationConfig:
        return dataclasses.replace(self, **changes)


