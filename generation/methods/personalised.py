"""Personalisation methods: a per-class artefact is trained (or reused), loaded, then prompted.

``textual-inversion`` learns new token embeddings per class (optionally generating from a class image,
DA-Fusion style); ``dreambooth`` learns a per-class LoRA (or a full UNet) bound to ``instance_token``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from retrogen.fileio import sha256_file

from ..artifacts import artifact_key
from ..prompts import class_prompts, class_subject, derive_seed
from . import register_method
from .base import ClassContext, ClassPlan, GenerationMethod, artifact_path, train_size


def _train_or_reuse(runtime: Any, ctx: ClassContext, *, kind: str, hparams: dict[str, Any],
                    build: Callable[[str, Path], dict[str, Any]]) -> tuple[dict, dict]:
    """Get the class's artefact from the store, training it (``build(key, tmp_dir)``) when missing.

    Returns (metadata, summary entry).
    """
    key = artifact_key(kind=kind, base_weights_hash=runtime.weights_hash,
                       image_sha256s=[sha256_file(it.path) for it in ctx.images], hyperparameters=hparams)
    description = {"label": ctx.label, "base_model": runtime.ref.id, "base_weights_hash": runtime.weights_hash,
                   "images": [it.image_id for it in ctx.images], "hyperparameters": hparams}
    t0 = time.perf_counter()
    meta, reused = ctx.store.get_or_build(kind, key, lambda tmp: build(key, tmp), description=description)
    entry = {"kind": kind, "key": key, "path": meta["path"], "hash": meta["hash"], "reused": reused,
             "train_s": round(time.perf_counter() - t0, 3), "num_train_steps": meta.get("num_train_steps"),
             "loss_first": meta.get("loss_first"), "loss_last": meta.get("loss_last")}
    return meta, entry


class PersonalisedMethod(GenerationMethod):
    """A per-class artefact trained from the class's images (SD 1.x/2.x); ``learning_rate`` falls back to the
    method's own default."""

    needs_images = True
    trains = True
    families = ("sd",)

    def default_learning_rate(self) -> float:
        raise NotImplementedError

    @property
    def learning_rate(self) -> float:
        return self.config.learning_rate or self.default_learning_rate()

    def training_settings(self, runtime: Any) -> dict[str, Any]:
        """The settings every trainer shares (``TrainerConfig``), from the generation config."""
        c = self.config
        return {"num_train_steps": c.num_train_steps, "learning_rate": self.learning_rate,
                "train_batch_size": c.train_batch_size, "resolution": train_size(runtime, c), "seed": c.seed,
                "precision": c.train_precision, "gradient_checkpointing": c.enable_gradient_checkpointing,
                "tf32": c.enable_tf32}


@register_method("textual-inversion")
class TextualInversionMethod(PersonalisedMethod):
    def default_learning_rate(self) -> float:
        return 5e-3

    def _train_config(self, runtime: Any, label: str, token: str):
        from ..training.textual_inversion import TextualInversionConfig

        c = self.config
        return TextualInversionConfig(placeholder_token=token, initializer=class_subject(label, c),
                                      num_vectors=c.num_vectors, **self.training_settings(runtime))

    def prepare_class(self, runtime: Any, ctx: ClassContext) -> ClassPlan:
        from ..training.textual_inversion import WEIGHT_NAME, token_names, train_textual_inversion

        hparams = self._train_config(runtime, ctx.label, "").hyperparameters()

        def build(key: str, tmp: Path) -> dict[str, Any]:
            cfg = self._train_config(runtime, ctx.label, f"<rg-{key[:10]}>")
            images = [ctx.load_image(it) for it in ctx.images]
            return train_textual_inversion(runtime.text2img, images, cfg, tmp, label=ctx.label,
                                           progress=ctx.progress, should_cancel=ctx.should_cancel)

        meta, entry = _train_or_reuse(runtime, ctx, kind="textual-inversion", hparams=hparams, build=build)
        token = f"<rg-{meta['key'][:10]}>"
        pipe = runtime.text2img
        pipe.load_textual_inversion(str(artifact_path(meta) / WEIGHT_NAME), token=token)
        tokens = token_names(token, self.config.num_vectors)
        plan_kw: dict[str, Any] = {}
        if self.config.enable_img2img:
            plan_kw = {"pipeline": "img2img", "init_images": ctx.images, "image_kwarg": "image",
                       "call_kwargs": {"strength": self.config.strength}}
        return ClassPlan(
            prompts=class_prompts(ctx.label, self.config, subject=token),
            fields={"adapter": f"textual-inversion:{meta['key']}", "adapter_hash": meta["hash"], "token": token},
            artifact=entry,
            release=lambda: pipe.unload_textual_inversion(tokens),
            **({"pipeline": "text2img"} | plan_kw),
        )

    def parameters(self) -> dict[str, Any]:
        c = self.config
        return {"num_train_steps": c.num_train_steps, "learning_rate": self.learning_rate,
                "num_vectors": c.num_vectors, "enable_img2img": c.enable_img2img,
                "strength": c.strength if c.enable_img2img else None}


def _load_dreambooth(runtime: Any, meta: dict[str, Any]) -> Callable[[], None]:
    """Put a DreamBooth artefact into the pipeline (the fine-tuned UNet, or the LoRA); returns its undo."""
    from ..training.dreambooth import LORA_WEIGHT_NAME

    pipe, path = runtime.text2img, artifact_path(meta)
    if meta.get("format") == "unet":
        from diffusers import UNet2DConditionModel

        base_unet = pipe.unet
        pipe.unet = UNet2DConditionModel.from_pretrained(path / "unet", dtype=runtime.dtype).to(runtime.device)

        def release() -> None:
            pipe.unet = base_unet

        return release
    from ..tuning import load_lora

    # With a compiled UNet (hotswap enabled at load) the next class's LoRA swaps into this one's slot, so the
    # adapter stays loaded between classes (unloading would recompile); the method's teardown unloads it.
    hotswap_rank = runtime.loaded.hotswap_rank if runtime.loaded is not None else None
    if meta.get("hyperparameters", {}).get("train_text_encoder"):
        hotswap_rank = None  # diffusers cannot hotswap text-encoder LoRA
    load_lora(pipe, str(path), LORA_WEIGHT_NAME, hotswap_rank=hotswap_rank, adapter_name=f"rg_{meta['key'][:10]}")
    return pipe.unload_lora_weights if hotswap_rank is None else _keep


@contextlib.contextmanager
def _base_model(pipe: Any) -> Iterator[None]:
    """The pipeline without a LoRA left loaded for hotswapping (disabled, then enabled again)."""
    if not getattr(pipe.unet, "peft_config", None):
        yield
        return
    pipe.disable_lora()
    try:
        yield
    finally:
        pipe.enable_lora()


def _keep() -> None:
    """A hotswapped LoRA stays loaded for the next class."""


@register_method("dreambooth")
class DreamBoothMethod(PersonalisedMethod):
    def default_learning_rate(self) -> float:
        return 5e-6 if self.config.enable_full_finetune else 1e-4

    def _train_config(self, runtime: Any, label: str):
        from ..training.dreambooth import DreamBoothConfig

        c = self.config
        name = class_subject(label, c)
        return DreamBoothConfig(
            instance_prompt=f"a photo of {c.instance_token} {name}", class_prompt=f"a photo of {name}",
            rank=c.lora_rank, train_text_encoder=c.enable_text_encoder_training,
            prior_preservation=c.enable_prior_preservation, num_class_images=c.num_class_images,
            prior_loss_weight=c.prior_loss_weight, full_finetune=c.enable_full_finetune,
            **self.training_settings(runtime),
        )

    def _prior_sampling(self, cfg) -> dict[str, Any]:
        """What shapes the prior-preservation images, hence the artefact (none without prior preservation)."""
        c = self.config
        if not cfg.prior_preservation:
            return {}
        return {"prior_sampling": {"num_inference_steps": c.num_inference_steps, "guidance_scale": c.guidance_scale,
                                   "scheduler": c.scheduler, "batch_size": c.batch_size}}

    def _class_images(self, runtime: Any, cfg, label: str) -> list:
        """Prior-preservation images from the base model, seeded like generated images."""
        import torch

        c = self.config
        out = []
        for start in range(0, cfg.num_class_images, c.batch_size):
            n = min(c.batch_size, cfg.num_class_images - start)
            gens = [torch.Generator().manual_seed(derive_seed(c.seed, f"{label}#prior", start + i)) for i in range(n)]
            out += runtime.text2img([cfg.class_prompt] * n, num_inference_steps=c.num_inference_steps,
                                    guidance_scale=c.guidance_scale, height=cfg.resolution, width=cfg.resolution,
                                    generator=gens).images
        return out

    def prepare_class(self, runtime: Any, ctx: ClassContext) -> ClassPlan:
        from ..training.dreambooth import train_dreambooth

        cfg = self._train_config(runtime, ctx.label)

        def build(key: str, tmp: Path) -> dict[str, Any]:
            images = [ctx.load_image(it) for it in ctx.images]
            class_images = None
            if cfg.prior_preservation:
                with _base_model(runtime.text2img):  # not through the last class's hotswap LoRA
                    class_images = self._class_images(runtime, cfg, ctx.label)
            return train_dreambooth(runtime.text2img, images, cfg, tmp, class_images=class_images, label=ctx.label,
                                    progress=ctx.progress, should_cancel=ctx.should_cancel)

        hparams = cfg.hyperparameters() | self._prior_sampling(cfg)
        meta, entry = _train_or_reuse(runtime, ctx, kind="dreambooth", hparams=hparams, build=build)
        release = _load_dreambooth(runtime, meta)
        subject = f"{self.config.instance_token} {class_subject(ctx.label, self.config)}"
        return ClassPlan(
            "text2img", class_prompts(ctx.label, self.config, subject=subject),
            fields={"adapter": f"dreambooth-{meta.get('format', 'lora')}:{meta['key']}", "adapter_hash": meta["hash"]},
            artifact=entry, release=release,
        )

    def teardown(self, runtime: Any) -> None:
        """Unload a LoRA left loaded for hotswapping."""
        if getattr(runtime.text2img.unet, "peft_config", None):
            runtime.text2img.unload_lora_weights()

    def parameters(self) -> dict[str, Any]:
        c = self.config
        return {"num_train_steps": c.num_train_steps, "lora_rank": c.lora_rank,
                "learning_rate": self.learning_rate,
                "enable_text_encoder_training": c.enable_text_encoder_training,
                "enable_prior_preservation": c.enable_prior_preservation, "num_class_images": c.num_class_images,
                "enable_full_finetune": c.enable_full_finetune, "instance_token": c.instance_token}
