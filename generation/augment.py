"""``augment_by_generation``: N generated images per class by one method, with provenance for each.

A call runs in four steps: check inputs (before any model loads or any file is written), load the model,
per class prepare (train / load adapters) and generate batches of seeded images, then the summary.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from retrogen import __version__
from retrogen.imagefolder import LabelledImage, safe_class_dir, scan_imagefolder
from retrogen.imageio import read_image_file
from retrogen.outputs import AugmentResult, OutputFolder
from retrogen.progress import CancelFn, ProgressEvent, ProgressFn, check_cancel, emit

from .artifacts import ArtifactStore
from .config import GenerationConfig
from .errors import InvalidConfigError
from .methods import create_method, list_methods
from .methods.base import ClassContext, ClassPlan, GenerationMethod
from .models import ModelRef, file_sha256, resolve_model
from .pipelines import PipelineCache
from .prompts import derive_seed
from .runtime import Runtime, load_runtime, oom_guard
from .schedulers import check_scheduler
from .writer import DEFAULT_THREADS, ImageSink


def _images_by_class(dataset_dir: str | os.PathLike) -> dict[str, list[LabelledImage]]:
    """The dataset's images per class, by label; an empty class folder is a class too (``prompt`` needs none)."""
    by_class: dict[str, list[LabelledImage]] = {}
    for it in scan_imagefolder(dataset_dir, min_per_class=0):
        by_class.setdefault(it.label, []).append(it)
    for d in sorted(p.name for p in Path(dataset_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        by_class.setdefault(safe_class_dir(d), [])
    return dict(sorted(by_class.items()))


def _check_inputs(dataset_dir: str | os.PathLike, out_dir: Path, *, per_class: int, method: GenerationMethod,
                  config: GenerationConfig, overwrite: bool) -> dict[str, list[LabelledImage]]:
    """Everything that can be refused before a model loads or a file is written; returns the classes."""
    if not isinstance(per_class, int) or per_class < 1:
        raise InvalidConfigError(f"per_class={per_class!r}: must be a positive integer")
    check_scheduler(config.scheduler)
    OutputFolder.check_writable(out_dir, overwrite=overwrite, methods=list_methods())
    by_class = _images_by_class(dataset_dir)
    unknown = sorted(set(config.class_prompts or {}) - set(by_class))
    if unknown:
        raise InvalidConfigError(f"class_prompts names classes not in the dataset: {unknown}")
    method.check_inputs(by_class)
    if method.needs_images:  # a corrupt user image fails here, named, before a model loads or a file is written
        for imgs in by_class.values():
            for it in imgs:
                read_image_file(it.path)
    return by_class


@contextlib.contextmanager
def _loaded(ref: ModelRef, config: GenerationConfig, progress: ProgressFn | None,
            pipelines: PipelineCache | None) -> Iterator[Runtime]:
    """The call's runtime: a fresh pipeline, or one from ``pipelines`` (reset and kept for the next call)."""
    emit(progress, ProgressEvent("load", 0, 1, message=f"loading {ref.id}"))
    with contextlib.ExitStack() as stack:
        runtime = stack.enter_context(pipelines.use(ref, config)) if pipelines else load_runtime(ref, config)
        emit(progress, ProgressEvent("load", 1, 1, message=f"{type(runtime.text2img).__name__} on {runtime.device}"))
        yield runtime


@contextlib.contextmanager
def _artifact_store(artifacts_dir: str | os.PathLike | None) -> Iterator[ArtifactStore]:
    """The caller's store, or one in a temporary folder deleted afterwards (nothing is reused then)."""
    if artifacts_dir is not None:
        yield ArtifactStore(artifacts_dir)
        return
    with tempfile.TemporaryDirectory(prefix="retrogen-artifacts-") as tmp:
        yield ArtifactStore(tmp)


class _Images:
    """User images decoded once (via retrogen.imageio), and square-cropped to the generation size on demand."""

    def __init__(self, size: int):
        self.size = size
        self._raw: dict[Path, Image.Image] = {}
        self._sized: dict[Path, Image.Image] = {}

    def raw(self, it: LabelledImage) -> Image.Image:
        if it.path not in self._raw:
            self._raw[it.path] = read_image_file(it.path)
        return self._raw[it.path]

    def sized(self, it: LabelledImage) -> Image.Image:
        if it.path not in self._sized:
            self._sized[it.path] = ImageOps.fit(self.raw(it), (self.size, self.size), Image.Resampling.BICUBIC)
        return self._sized[it.path]


def generate_batch(runtime: Runtime, plan: ClassPlan, label: str, indices: list[int],
                   images: _Images) -> list[tuple[Any, dict[str, Any]]]:
    """One pipeline call for ``indices`` of ``label``; every image gets its own seeded generator.

    Returns each image, as the pipeline's ``output_type="np"`` array (H, W, 3 floats in [0, 1]; the writer
    threads turn it into the PIL image and PNG diffusers' default output would give), with its provenance fields.
    """
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
        "output_type": "np",
        **plan.call_kwargs,
    }
    if plan.image_kwarg == "image":
        kwargs["image"] = [images.sized(it) for it in inits]
    elif plan.image_kwarg == "ip_adapter_image":
        kwargs["ip_adapter_image"] = [[images.sized(it) for it in inits]]  # one adapter, one image per prompt
    if plan.pipeline == "text2img":
        kwargs.update(height=runtime.size, width=runtime.size)
    out = pipe(**kwargs).images
    shared = {"pipeline": type(pipe).__name__, "scheduler": c.scheduler,
              "scheduler_class": type(pipe.scheduler).__name__} | runtime.provenance()
    results = []
    for k, (im, i) in enumerate(zip(out, indices, strict=True)):
        init = inits[k] if inits else None
        results.append((im, shared | {
            "index": i, "prompt": prompts[k], "negative_prompt": c.negative_prompt, "seed": seeds[k],
            "num_inference_steps": c.num_inference_steps, "guidance_scale": c.guidance_scale,
            "strength": plan.call_kwargs.get("strength"), "width": im.shape[1], "height": im.shape[0],
            "init_image": init.image_id if init else None,
            "init_image_sha256": file_sha256(init.path) if init else None,
            "adapter": None, "adapter_hash": None,
        } | plan.fields))
    return results


@dataclass
class _Call:
    """One call's loaded state that the per-class steps share, and what they add up for the summary."""

    method: GenerationMethod
    runtime: Runtime
    store: ArtifactStore
    sink: ImageSink  # saves images off this thread, in order
    per_class: int
    total: int  # images over all classes
    progress: ProgressFn | None
    should_cancel: CancelFn | None
    timings: dict[str, float]  # seconds: load, prepare (training included), generate
    per_class_summary: dict[str, dict[str, Any]] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    images: _Images = field(init=False)

    def __post_init__(self) -> None:
        self.images = _Images(self.runtime.size)

    def prepare(self, label: str, class_images: list[LabelledImage]) -> ClassPlan:
        """Train or reuse the class's artefact, or load its adapters: whatever the method needs."""
        ctx = ClassContext(label, class_images, self.store, self.images.raw, self.progress, self.should_cancel)
        t0 = time.perf_counter()
        with oom_guard(self.runtime, f"preparing class {label!r} for {self.method.name}"):
            plan = self.method.prepare_class(self.runtime, ctx)
        self.timings["prepare"] += time.perf_counter() - t0
        if plan.artifact:
            self.artifacts[label] = plan.artifact
        return plan

    def generate(self, label: str, plan: ClassPlan) -> None:
        """The class's images in batches, each handed to the writer threads with its record (the next batch
        denoises while they save); the plan is released after."""
        t0, batch_size = time.perf_counter(), self.runtime.batch_size
        try:
            emit(self.progress, ProgressEvent("generate", 0, self.per_class, label))
            for start in range(0, self.per_class, batch_size):
                check_cancel(self.should_cancel)
                indices = list(range(start, min(start + batch_size, self.per_class)))
                with oom_guard(self.runtime, f"generating {len(indices)} images at {self.runtime.size}px"):
                    batch = generate_batch(self.runtime, plan, label, indices, self.images)
                for im, fields in batch:
                    self.sink.put(label=label, filename=f"{fields['index']:05d}.png", image=im,
                                  method=self.method.name, fields=fields)
                emit(self.progress, ProgressEvent("generate", indices[-1] + 1, self.per_class, label, extra={
                    "overall_done": self.sink.submitted, "overall_total": self.total}))
        finally:
            if plan.release:
                plan.release()
        self.timings["generate"] += time.perf_counter() - t0
        self.per_class_summary[label] = {"requested": self.per_class, "returned": self.per_class, "reason": None}

    def summary(self, *, duration: float, artifacts_dir: str | os.PathLike | None) -> dict[str, Any]:
        """summary.json: counts, timings, the model, the artefacts and every parameter of the call."""
        runtime, ref, n = self.runtime, self.runtime.ref, len(self.sink.writer.records)
        return {
            "method": self.method.name,
            "per_class": self.per_class_summary,
            "duration_s": round(duration, 3),
            "images_per_s": round(n / duration, 4) if duration > 0 else None,
            "timing_s": {stage: round(s, 3) for stage, s in self.timings.items()},
            "model": {"id": ref.id, "revision": ref.revision, "path": str(ref.path),
                      "weights_hash": runtime.weights_hash, "pipeline_class": ref.pipeline_class},
            "artifacts": self.artifacts,
            # the size used, not the config's (None there means the model's native size)
            "parameters": {"model": ref.id, "method": self.method.name, "per_class": self.per_class,
                           **runtime.config.to_dict(), "size": runtime.size,
                           "method_parameters": self.method.parameters(),
                           "artifacts_dir": str(artifacts_dir) if artifacts_dir is not None else None},
            "runtime": runtime.provenance() | {"batch_size": runtime.batch_size},
            "retrogen_version": __version__,
        }


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
    overwrite: bool = False,
    pipelines: PipelineCache | None = None,
    writer_threads: int = DEFAULT_THREADS,
) -> AugmentResult:
    """Generate ``per_class`` images for every class of ``dataset_dir`` into ``out_dir``.

    Args:
        dataset_dir: ImageFolder (``<class>/<image>``); class folders may be empty for ``prompt``.
        out_dir: output folder (ImageFolder + provenance.jsonl + summary.json); new or empty, unless
            ``overwrite``.
        model: hub id or local diffusers model directory (SD 1.x/2.x; SDXL for prompt/img2img/variation).
        method: one of ``list_methods()``.
        per_class: images to generate per class.
        config: sampling, prompt, runtime and training settings.
        artifacts_dir: where personalisation artefacts are stored and reused; None: a temporary folder
            deleted afterwards (nothing reused).
        progress: receives ``ProgressEvent``s: ``load``, ``train`` (per step, ``extra["loss"]``),
            ``generate`` (done/total per class).
        should_cancel: polled between batches and training steps.
        overwrite: replace an earlier generation output in ``out_dir`` (cleared first, once the model loaded).
        pipelines: keep the loaded pipeline here for later calls (an LRU within a memory budget, see
            :class:`PipelineCache`); None: load for this call and free afterwards.
        writer_threads: PNG encoder threads saving images while the next batch generates; 0 saves inline
            (same output either way).

    Returns:
        AugmentResult with the summary (as written to summary.json) and the provenance records.

    Raises:
        GenerationError subclasses (unknown model/scheduler/method, wrong model dir, method needs images,
        GPU out of memory), OutputExistsError, DatasetLayoutError, BadImageError, CancelledError.
    """
    t_start = time.perf_counter()
    config = config or GenerationConfig()
    out_dir = Path(out_dir)
    # 1. Check inputs (no model loaded, nothing written yet).
    gen_method = create_method(method, config)
    by_class = _check_inputs(dataset_dir, out_dir, per_class=per_class, method=gen_method, config=config,
                             overwrite=overwrite)
    ref = resolve_model(model, revision=config.revision, local_files_only=config.local_files_only)
    gen_method.check_model(ref.family)

    # 2. Load the model (or take it from the cache) and the method's shared parts.
    with _loaded(ref, config, progress, pipelines) as runtime:
        timings = {"load": time.perf_counter() - t_start, "prepare": 0.0, "generate": 0.0}
        gen_method.setup(runtime)
        try:
            return _run(gen_method, runtime, by_class, out_dir, per_class=per_class, timings=timings,
                        call_kwargs={"progress": progress, "should_cancel": should_cancel},
                        artifacts_dir=artifacts_dir, overwrite=overwrite, writer_threads=writer_threads,
                        t_start=t_start)
        finally:
            gen_method.teardown(runtime)


def _run(method: GenerationMethod, runtime: Runtime, by_class: dict[str, list[LabelledImage]], out_dir: Path, *,
         per_class: int, timings: dict[str, float], call_kwargs: dict[str, Any],
         artifacts_dir: str | os.PathLike | None, overwrite: bool, writer_threads: int,
         t_start: float) -> AugmentResult:
    """Steps 3 and 4 on a loaded runtime: every class's images through the writer threads, then the summary."""
    with _artifact_store(artifacts_dir) as store, OutputFolder.create(
            out_dir, overwrite=overwrite, methods=list_methods()) as writer:
        with ImageSink(writer, threads=writer_threads) as sink:
            call = _Call(method, runtime, store, sink, per_class=per_class, total=per_class * len(by_class),
                         timings=timings, **call_kwargs)
            # 3. Per class: prepare (train / load adapters), then batches of seeded images.
            for label, class_images in by_class.items():
                call.generate(label, call.prepare(label, class_images))
        # every image is saved once the sink closes (a saving error is raised there)

        # 4. Summary last: its presence marks the folder complete.
        summary = call.summary(duration=time.perf_counter() - t_start, artifacts_dir=artifacts_dir)
        writer.close(summary)
        return AugmentResult(out_dir, summary, list(writer.records))
