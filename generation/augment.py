"""``augment_by_generation``: N generated images per class by one method, with provenance for each."""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from retrogen import __version__
from retrogen.fileio import sha256_bytes
from retrogen.imagefolder import LabelledImage, safe_class_dir, scan_imagefolder
from retrogen.imageio import decode_image
from retrogen.outputs import SUMMARY_FILE, AugmentResult, OutputFolder
from retrogen.progress import CancelFn, ProgressEvent, ProgressFn, check_cancel, emit

from .artifacts import ArtifactStore
from .config import GenerationConfig
from .errors import InvalidConfigError, OutputExistsError
from .methods import create_method
from .methods.base import ClassContext, ClassPlan
from .prompts import derive_seed
from .schedulers import check_scheduler

log = logging.getLogger(__name__)


def _check_inputs(dataset_dir: str | os.PathLike, out_dir: Path, per_class: int, method: Any,
                  config: GenerationConfig) -> dict[str, list[LabelledImage]]:
    if not isinstance(per_class, int) or per_class < 1:
        raise InvalidConfigError(f"per_class={per_class!r}: must be a positive integer")
    check_scheduler(config.scheduler)
    if (out_dir / SUMMARY_FILE).exists():
        raise OutputExistsError(f"{out_dir} already holds an augmentation output (summary.json); choose another --out")
    items = scan_imagefolder(dataset_dir, min_per_class=0)
    by_class: dict[str, list[LabelledImage]] = {}
    for it in items:
        by_class.setdefault(it.label, [])
        by_class[it.label].append(it)
    root = Path(dataset_dir)
    for d in sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        by_class.setdefault(safe_class_dir(d), [])
    unknown = sorted(set(config.class_prompts or {}) - set(by_class))
    if unknown:
        raise InvalidConfigError(f"class_prompts names classes not in the dataset: {unknown}")
    method.check_inputs(by_class)
    if method.needs_images:  # a corrupt user image fails here, before a model loads or a file is written
        for imgs in by_class.values():
            for it in imgs:
                decode_image(it.path.read_bytes())
    return dict(sorted(by_class.items()))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class _Images:
    """User images decoded once (via retrogen.imageio), and square-cropped to the generation size on demand."""

    def __init__(self, size: int):
        self.size = size
        self._raw: dict[Path, Image.Image] = {}
        self._sized: dict[Path, Image.Image] = {}

    def raw(self, it: LabelledImage) -> Image.Image:
        if it.path not in self._raw:
            self._raw[it.path] = decode_image(it.path.read_bytes())
        return self._raw[it.path]

    def sized(self, it: LabelledImage) -> Image.Image:
        if it.path not in self._sized:
            self._sized[it.path] = ImageOps.fit(self.raw(it), (self.size, self.size), Image.Resampling.BICUBIC)
        return self._sized[it.path]


def generate_batch(runtime: Any, plan: ClassPlan, label: str, indices: list[int],
                   images: _Images) -> list[tuple[Image.Image, dict[str, Any]]]:
    """One pipeline call for ``indices`` of ``label``; every image gets its own seeded generator."""
    import torch

    c = runtime.config
    pipe = runtime.img2img if plan.pipeline == "img2img" else runtime.text2img
    seeds = [derive_seed(c.seed, label, i) for i in indices]
    prompts = [plan.prompts[i % len(plan.prompts)] for i in indices]
    inits = [plan.init_images[i % len(plan.init_images)] for i in indices] if plan.init_images else []
    kwargs: dict[str, Any] = {
        "prompt": prompts,
        "negative_prompt": [c.negative_prompt] * len(indices) if c.negative_prompt else None,
        "num_inference_steps": c.num_inference_steps,
        "guidance_scale": c.guidance_scale,
        # CPU generators: the same seed gives the same latents on any device, and batch size does not matter.
        "generator": [torch.Generator().manual_seed(s) for s in seeds],
        **plan.call_kwargs,
    }
    if plan.image_kwarg == "image":
        kwargs["image"] = [images.sized(it) for it in inits]
    elif plan.image_kwarg == "ip_adapter_image":
        kwargs["ip_adapter_image"] = [[images.sized(it) for it in inits]]  # one adapter, one image per prompt
    if plan.pipeline == "text2img":
        kwargs.update(height=runtime.size, width=runtime.size)
    out = pipe(**kwargs).images
    fields = {"pipeline": type(pipe).__name__, "scheduler": c.scheduler,
              "scheduler_class": type(pipe.scheduler).__name__} | runtime.provenance()
    results = []
    for k, (im, i) in enumerate(zip(out, indices, strict=True)):
        init = inits[k] if inits else None
        results.append((im, fields | {
            "index": i, "prompt": prompts[k], "negative_prompt": c.negative_prompt, "seed": seeds[k],
            "num_inference_steps": c.num_inference_steps, "guidance_scale": c.guidance_scale,
            "strength": plan.call_kwargs.get("strength"), "width": im.width, "height": im.height,
            "init_image": init.image_id if init else None,
            "init_image_sha256": sha256_bytes(init.path.read_bytes()) if init else None,
            "adapter": None, "adapter_hash": None,
        } | plan.fields))
    return results


def augment_by_generation(
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model: str,
    method: str,
    per_class: int,
    config: GenerationConfig | None = None,
    artifacts_dir: str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> AugmentResult:
    """Generate ``per_class`` images for every class of ``dataset_dir`` into ``out_dir``.

    Args:
        dataset_dir: ImageFolder (``<class>/<image>``); class folders may be empty for ``prompt``.
        out_dir: output folder (ImageFolder + provenance.jsonl + summary.json); must not hold a summary.
        model: hub id or local diffusers model directory (SD 1.x/2.x; SDXL for prompt/img2img/variation).
        method: one of ``list_methods()``.
        per_class: images to generate per class.
        config: sampling, prompt, runtime and training settings.
        artifacts_dir: where personalisation artefacts are stored and reused; None: a temporary folder
            deleted afterwards (nothing reused).
        progress: receives ``ProgressEvent``s: ``load``, ``train`` (per step, ``extra["loss"]``),
            ``generate`` (done/total per class).
        should_cancel: polled between batches and training steps.

    Returns:
        AugmentResult with the summary (as written to summary.json) and the provenance records.

    Raises:
        GenerationError subclasses (unknown model/scheduler/method, wrong model dir, method needs images,
        GPU out of memory), DatasetLayoutError, BadImageError, CancelledError.
    """
    from .models import resolve_model
    from .runtime import load_runtime, oom_guard

    t_start = time.perf_counter()
    config = config or GenerationConfig()
    out_dir = Path(out_dir)
    # 1. Check inputs (no model loaded, nothing written yet).
    gen_method = create_method(method, config)
    by_class = _check_inputs(dataset_dir, out_dir, per_class, gen_method, config)
    ref = resolve_model(model, revision=config.revision, local_files_only=config.local_files_only)
    gen_method.check_model(ref.family)

    # 2. Load the model and the method's shared parts.
    emit(progress, ProgressEvent("load", 0, 1, message=f"loading {model}"))
    runtime = load_runtime(ref, config)
    emit(progress, ProgressEvent("load", 1, 1, message=f"{type(runtime.text2img).__name__} on {runtime.device}"))
    load_s = time.perf_counter() - t_start
    gen_method.setup(runtime)

    tmp_store = tempfile.TemporaryDirectory(prefix="retrogen-artifacts-") if artifacts_dir is None else None
    store = ArtifactStore(artifacts_dir if artifacts_dir is not None else tmp_store.name)
    images = _Images(runtime.size)
    per_class_summary: dict[str, dict[str, Any]] = {}
    artifacts: dict[str, Any] = {}
    train_s = gen_s = 0.0
    total = per_class * len(by_class)
    try:
        with OutputFolder.create(out_dir) as writer:
            # 3. Per class: prepare (train / load adapters), then batches of seeded images.
            for label, class_images in by_class.items():
                ctx = ClassContext(label, class_images, store, images.raw, progress, should_cancel)
                t0 = time.perf_counter()
                with oom_guard(runtime, f"preparing class {label!r} for {method}"):
                    plan = gen_method.prepare_class(runtime, ctx)
                train_s += time.perf_counter() - t0
                if plan.artifact:
                    artifacts[label] = plan.artifact
                t0 = time.perf_counter()
                try:
                    emit(progress, ProgressEvent("generate", 0, per_class, label))
                    for start in range(0, per_class, config.batch_size):
                        check_cancel(should_cancel)
                        indices = list(range(start, min(start + config.batch_size, per_class)))
                        with oom_guard(runtime, f"generating {len(indices)} images at {runtime.size}px"):
                            batch = generate_batch(runtime, plan, label, indices, images)
                        for im, fields in batch:
                            writer.add(label=label, filename=f"{fields['index']:05d}.png", image_bytes=_png(im),
                                       method=method, fields=fields)
                        done = indices[-1] + 1
                        emit(progress, ProgressEvent("generate", done, per_class, label, extra={
                            "overall_done": len(writer.records), "overall_total": total}))
                finally:
                    if plan.release:
                        plan.release()
                gen_s += time.perf_counter() - t0
                per_class_summary[label] = {"requested": per_class, "returned": per_class, "reason": None}

            # 4. Summary last: its presence marks the folder complete.
            duration = time.perf_counter() - t_start
            summary = {
                "method": method,
                "per_class": per_class_summary,
                "duration_s": round(duration, 3),
                "images_per_s": round(len(writer.records) / duration, 4) if duration > 0 else None,
                "timing_s": {"load": round(load_s, 3), "prepare": round(train_s, 3), "generate": round(gen_s, 3)},
                "model": {"id": ref.id, "revision": ref.revision, "weights_hash": runtime.weights_hash,
                          "pipeline_class": ref.pipeline_class},
                "artifacts": artifacts,
                "parameters": {"model": model, "method": method, "per_class": per_class, "size": runtime.size,
                               **config.to_dict(), "method_parameters": gen_method.parameters(),
                               "artifacts_dir": str(artifacts_dir) if artifacts_dir is not None else None},
                "runtime": runtime.provenance(),
                "retrogen_version": __version__,
            }
            writer.close(summary)
            return AugmentResult(out_dir, summary, list(writer.records))
    finally:
        gen_method.teardown(runtime)
        if tmp_store is not None:
            tmp_store.cleanup()


