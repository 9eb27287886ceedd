"""``retrogen augment generate``: the generation backend from the command line, with progress bars.

Only typer and light modules load at import time; torch and diffusers load when the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .config import GenerationConfig

_D = GenerationConfig()
DEFAULT_ARTIFACTS_DIR = Path("~/.cache/retrogen/artifacts")


def _read_json(path: Path | None, what: str) -> dict | None:
    from .errors import InvalidConfigError

    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InvalidConfigError(f"--{what}: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise InvalidConfigError(f"--{what}: {path} must hold a JSON object {{label: ...}}")
    return data


class _Bars:
    """One tqdm bar per (stage, class); training bars show the latest loss."""

    def __init__(self) -> None:
        self.bars: dict = {}

    def __call__(self, event) -> None:
        from tqdm import tqdm

        if event.stage == "load":
            if event.done == event.total and event.message:
                tqdm.write(f"loaded: {event.message}")
            return
        key = (event.stage, event.label)
        bar = self.bars.get(key)
        if bar is None:
            desc = f"{'training' if event.stage == 'train' else 'generating'} {event.label}"
            bar = self.bars[key] = tqdm(total=event.total, desc=desc, unit="step" if event.stage == "train" else "img",
                                        leave=True, dynamic_ncols=True)
        bar.update(event.done - bar.n)
        if "loss" in event.extra:
            bar.set_postfix(loss=f"{event.extra['loss']:.4f}")
        if event.done >= event.total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def generate(
    model: str = typer.Option(..., "--model", help="Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) or local diffusers folder."),
    dataset: Path = typer.Option(..., "--dataset", help="ImageFolder: one folder of images per class."),
    method: str = typer.Option(..., "--method", help="prompt, img2img, variation, textual-inversion, dreambooth."),
    per_class: int = typer.Option(..., "--per-class", help="Images to generate per class."),
    out: Path = typer.Option(..., "--out", help="Output folder (must not hold a finished output)."),
    steps: int = typer.Option(_D.num_inference_steps, "--steps", help="Denoising steps."),
    guidance: float = typer.Option(_D.guidance_scale, "--guidance", help="Classifier-free guidance scale."),
    strength: float = typer.Option(_D.strength, "--strength", help="img2img noise strength (0-1]."),
    size: int | None = typer.Option(None, "--size", help="Square output size in px (default: model's)."),
    batch_size: int = typer.Option(_D.batch_size, "--batch-size", help="Images per pipeline call."),
    seed: int = typer.Option(_D.seed, "--seed", help="Base seed; per-image seeds derive from it."),
    scheduler: str = typer.Option(_D.scheduler, "--scheduler", help="dpm++, dpm++-karras, unipc, euler, euler-a, ddim, pndm, lms, heun, ddpm, model."),
    prompt_template: list[str] = typer.Option(list(_D.prompt_templates), "--prompt-template", help="Template with {} for the class name; repeat for several; 'ensemble' for a built-in set."),
    class_prompts: Path | None = typer.Option(None, "--class-prompts", help="JSON {label: [prompts]} replacing templates."),
    class_names: Path | None = typer.Option(None, "--class-names", help="JSON {label: name used in prompts}."),
    negative_prompt: str | None = typer.Option(None, "--negative-prompt"),
    train_steps: int = typer.Option(_D.num_train_steps, "--train-steps", help="Personalisation steps per class."),
    learning_rate: float | None = typer.Option(None, "--learning-rate"),
    train_batch_size: int = typer.Option(_D.train_batch_size, "--train-batch-size"),
    train_size: int | None = typer.Option(None, "--train-size", help="Training resolution (default: --size)."),
    num_vectors: int = typer.Option(_D.num_vectors, "--num-vectors", help="textual-inversion: vectors per class."),
    enable_img2img: bool = typer.Option(False, "--enable-img2img", help="textual-inversion: start from class images (DA-Fusion)."),
    lora_rank: int = typer.Option(_D.lora_rank, "--lora-rank"),
    enable_text_encoder_training: bool = typer.Option(False, "--enable-text-encoder-training"),
    enable_prior_preservation: bool = typer.Option(False, "--enable-prior-preservation"),
    num_class_images: int = typer.Option(_D.num_class_images, "--num-class-images"),
    enable_full_finetune: bool = typer.Option(False, "--enable-full-finetune", help="dreambooth: train the whole UNet."),
    instance_token: str = typer.Option(_D.instance_token, "--instance-token"),
    ip_adapter: str | None = typer.Option(None, "--ip-adapter", help="variation: .safetensors file or org/repo/sub/file."),
    ip_adapter_scale: float = typer.Option(_D.ip_adapter_scale, "--ip-adapter-scale"),
    enable_variation_prompt: bool = typer.Option(False, "--enable-variation-prompt"),
    revision: str | None = typer.Option(None, "--revision", help="Hub model: branch, tag or commit."),
    local_files_only: bool = typer.Option(False, "--local-files-only", help="Hub model: use the local cache only."),
    device: str = typer.Option(_D.device, "--device"),
    dtype: str = typer.Option(_D.dtype, "--dtype", help="auto, float16, bfloat16, float32."),
    enable_cpu_offload: bool = typer.Option(False, "--enable-cpu-offload"),
    enable_compile: bool = typer.Option(False, "--enable-compile"),
    artifacts_dir: Path = typer.Option(DEFAULT_ARTIFACTS_DIR, "--artifacts-dir", help="Personalisation artefact cache."),
) -> None:
    """Generate N images per class with Stable Diffusion; write images + provenance.jsonl + summary.json."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .augment import augment_by_generation

    config = GenerationConfig(
        num_inference_steps=steps, guidance_scale=guidance, strength=strength, size=size, batch_size=batch_size,
        seed=seed, scheduler=scheduler, prompt_templates=tuple(prompt_template),
        class_prompts=_read_json(class_prompts, "class-prompts"), class_names=_read_json(class_names, "class-names"),
        negative_prompt=negative_prompt, revision=revision, local_files_only=local_files_only,
        device=device, dtype=dtype, enable_cpu_offload=enable_cpu_offload,
        enable_compile=enable_compile, ip_adapter=ip_adapter, ip_adapter_scale=ip_adapter_scale,
        enable_variation_prompt=enable_variation_prompt, num_train_steps=train_steps, learning_rate=learning_rate,
        train_batch_size=train_batch_size, train_size=train_size, num_vectors=num_vectors,
        enable_img2img=enable_img2img, lora_rank=lora_rank, enable_text_encoder_training=enable_text_encoder_training,
        enable_prior_preservation=enable_prior_preservation, num_class_images=num_class_images,
        enable_full_finetune=enable_full_finetune, instance_token=instance_token,
    )
    diffusers_logging.disable_progress_bar()  # our bars replace the per-component loading bars
    transformers_logging.disable_progress_bar()
    bars = _Bars()
    try:
        result = augment_by_generation(dataset, out, model=model, method=method, per_class=per_class, config=config,
                                       artifacts_dir=artifacts_dir.expanduser(), progress=bars)
    finally:
        bars.close()
    s = result.summary
    trained = sum(not a["reused"] for a in s["artifacts"].values())
    reused = len(s["artifacts"]) - trained
    extra = f"; artefacts trained {trained}, reused {reused}" if s["artifacts"] else ""
    typer.echo(
        f"generated {len(result.records)} images for {len(s['per_class'])} classes by {method} into {out} "
        f"in {s['duration_s']:.1f} s ({s['images_per_s']:.2f} images/s){extra}"
    )
