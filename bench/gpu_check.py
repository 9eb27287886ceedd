"""One GPU check: the figures issue 14 asks for, in one run, with no internet (bench/gpu_check.sh wraps it).

Sections (``--only`` picks some; each prints its figures, or one line saying why it was skipped):

- ``env``: what is importable (torch, CUDA, the GPU, diffusers, transformers, peft, open_clip, faiss, retrogen).
- ``sd15`` / ``sdxl``: SD 1.5 at 512 px and SDXL at 1024 px, full-size UNet / VAE / text encoders built from
  their published configs with random weights (speed does not depend on weights), images/s of retrogen's
  ``prompt``, ``img2img`` and personalised (DreamBooth-LoRA, SD 1.5 only: retrogen personalises SD 1.x/2.x)
  paths against a plain diffusers pipeline call with its defaults (float32, one image per call, the model's
  scheduler) on the same model, steps and size, as a ratio; peak GPU memory of each.
- ``training``: Textual Inversion and DreamBooth-LoRA steps/s on SD 1.5 at 512 px.
- ``clip``: open_clip ViT-B/32 and ViT-L/14 (random weights, ``open_clip.create_model(name, pretrained=None)``
  saved in the ``local-dir`` layout) embedding images/s through retrogen's ``index build`` path.
- ``search``: exact top-10 search over 1M x 768 vectors: queries/s on the GPU (faiss-gpu when importable,
  else torch matmul + top-k, said so) and on the CPU (faiss ``IndexFlatIP``, else torch).

``--dry-run``: tiny models and sizes on the CPU in seconds (the test suite runs it); the figures then only
prove that every path runs. ``--json FILE`` writes every figure.

    bench/gpu_check.sh                       # on the GPU host: < 8 min on one H100 / H200
    bench/gpu_check.sh --dry-run --json /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.tiny_sd / tests.tiny_clip
sys.path.insert(0, str(ROOT / "bench"))  # bench_generation's published configs
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

SECTIONS = ("env", "sd15", "sdxl", "training", "clip", "search")
NEEDS = {
    "sd15": ("torch", "diffusers", "transformers", "retrogen.generation"),
    "sdxl": ("torch", "diffusers", "transformers", "retrogen.generation"),
    "training": ("torch", "diffusers", "transformers", "peft", "retrogen.generation"),
    "clip": ("torch", "open_clip", "faiss", "retrogen.index_builder"),  # index build trains a FAISS index
    "search": ("torch", "numpy"),
}
PROMPT = "a photo of a class0"


class Skip(Exception):
    """A section that cannot run here, with the reason printed instead of figures."""


# --- set-up -----------------------------------------------------------------------------------------------


def ensure_retrogen() -> str:
    """Import retrogen installed, else from this source tree, its library folders mapped under ``retrogen.`` as
    the wheel maps them (``generation/`` is ``retrogen.generation``...)."""
    import importlib.util

    import retrogen  # the foundation: installed, or ROOT/retrogen through sys.path

    if importlib.util.find_spec("retrogen.generation") is not None:
        return "installed"
    retrogen.__path__.append(str(ROOT))  # retrogen.<library> -> ROOT/<library>
    return "from the source tree (not installed)"


def importable(name: str) -> tuple[bool, str]:
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any import failure is a 'missing' line
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return True, str(getattr(mod, "__version__", "") or "ok")


def device_of(args: argparse.Namespace) -> str:
    import torch

    if args.dry_run:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


# --- models ---------------------------------------------------------------------------------------------------


def build_model(kind: str, path: Path, device: str, dry_run: bool) -> Path:
    """The tests' tiny model (dry run), else SD 1.5 / SDXL from published configs with random weights, built on
    ``device`` (fast on a GPU) and saved in float16 as a diffusers folder; reused when already there."""
    if (path / "model_index.json").exists():
        return path
    if dry_run:
        from tests.tiny_sd import build_tiny_sd, build_tiny_sdxl

        return (build_tiny_sd if kind == "sd15" else build_tiny_sdxl)(path)
    import torch

    pipe = full_size_pipeline(kind, device)
    pipe.to(torch.float16).save_pretrained(path, safe_serialization=True)
    del pipe
    reset_peak(device)
    return path


def full_size_pipeline(kind: str, device: str = "cpu") -> Any:
    """The published architecture with random weights; the networks are created on ``device`` (the schedulers and
    tokenizers on the CPU)."""
    import torch
    from bench_generation import (
        SD15_SCHEDULER,
        SD15_TEXT,
        SD15_UNET,
        SD15_VAE,
        SDXL_SCHEDULER,
        SDXL_TEXT2,
        SDXL_UNET,
        SDXL_VAE,
    )
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tests.tiny_sd import build_tiny_tokenizer  # one token per character; speed does not depend on it

    torch.manual_seed(0)
    with torch.device(device):
        nets = {"text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT))}
        if kind == "sd15":
            nets.update(vae=AutoencoderKL(**SD15_VAE), unet=UNet2DConditionModel(**SD15_UNET))
        else:
            nets.update(vae=AutoencoderKL(**SDXL_VAE),
                        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT2)),
                        unet=UNet2DConditionModel(**SDXL_UNET))
    if kind == "sd15":
        return StableDiffusionPipeline(**nets, tokenizer=build_tiny_tokenizer(), scheduler=PNDMScheduler(**SD15_SCHEDULER),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return StableDiffusionXLPipeline(**nets, tokenizer=build_tiny_tokenizer(), tokenizer_2=build_tiny_tokenizer(),
                                     scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER))


def make_dataset(root: Path, classes: int, images: int, size: int = 96) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(images):
            arr = rng.integers(0, 255, (size, size + 16, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.jpg", quality=90)
    return root


# --- sections -------------------------------------------------------------------------------------------------


def section_env(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "retrogen": ensure_retrogen()}
    for name in ("torch", "diffusers", "transformers", "peft", "open_clip", "faiss", "numpy", "PIL"):
        ok, what = importable(name)
        out[name] = what if ok else f"MISSING ({what})"
    ok, _ = importable("torch")
    if ok:
        import torch

        out["cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            out.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                       gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       bf16=torch.cuda.is_bf16_supported(), torch_cuda=torch.version.cuda)
    if out["faiss"].startswith("MISSING") is False:
        import faiss

        out["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    for name in ("retrogen.generation", "retrogen.index_builder"):
        ok, what = importable(name)
        out[name] = "ok" if ok else f"MISSING ({what})"
    return out


def _gen_settings(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    if args.dry_run:
        return {"size": 64, "steps": 2, "n": 4, "n_base": 2, "batch": 2, "train_steps": 2}
    if kind == "sd15":
        return {"size": 512, "steps": args.steps, "n": 32, "n_base": 4, "batch": 8, "train_steps": 20}
    return {"size": 1024, "steps": args.steps, "n": 8, "n_base": 2, "batch": 4, "train_steps": 0}


def _diffusers_baseline(model: Path, kind: str, s: dict[str, Any], device: str, init: Any) -> dict[str, Any]:
    """Plain diffusers calls with their defaults (float32, one image per call, the model's own scheduler) at the
    same steps and size: text-to-image, and image-to-image at retrogen's strength (0.5) from ``init``."""
    from diffusers import AutoPipelineForImage2Image, StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(model)).to(device)
    pipe.set_progress_bar_config(disable=True)
    i2i = AutoPipelineForImage2Image.from_pipe(pipe)
    i2i.set_progress_bar_config(disable=True)
    calls = {
        "text2img": lambda: pipe(PROMPT, num_inference_steps=s["steps"], height=s["size"], width=s["size"]).images,
        "img2img": lambda: i2i(PROMPT, image=init.resize((s["size"], s["size"])), strength=0.5,
                               num_inference_steps=s["steps"]).images,
    }
    figs = {}
    for name, call in calls.items():
        call()  # warm-up
        reset_peak(device)
        _, seconds = timed(lambda c=call: [c() for _ in range(s["n_base"])], device)
        figs[name] = {"img_s": round(s["n_base"] / seconds, 3), "peak_gib": peak_gib(device), "dtype": str(pipe.dtype)}
    return figs  # the pipelines go with this frame; the caller frees the memory


def _retrogen_case(method: str, model: Path, work: Path, s: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """One retrogen call (the pipeline cached, artefacts already trained by the warm-up), timed end to end:
    generation, PNG encoding, hashing and writing, provenance."""
    from retrogen.generation import GenerationConfig, augment_by_generation

    device, cache, data = env["device"], env["cache"], env["data"]
    cfg = GenerationConfig(num_inference_steps=s["steps"], size=s["size"], batch_size=s["batch"],
                           enable_auto_batch_size=device == "cuda", enable_compile=env["compile"],
                           num_train_steps=max(2, s["train_steps"]), train_size=s["size"], device=device)
    arts = work / f"artifacts-{model.name}"

    def call(per_class: int, tag: str) -> Any:
        return augment_by_generation(data, work / f"out-{model.name}-{method}-{tag}", model=str(model), method=method,
                                     per_class=per_class, config=cfg, artifacts_dir=arts, pipelines=cache)

    call(1, "warm")  # loads (or reuses) the pipeline, compiles, trains the artefacts
    reset_peak(device)
    result, seconds = timed(lambda: call(s["n"] // 2, "timed"), device)
    n = len(result.records)
    return {"img_s": round(n / seconds, 3), "peak_gib": peak_gib(device), "images": n,
            "batch_size": result.summary["runtime"]["batch_size"], "sdpa": result.summary["runtime"]["sdpa"],
            "vae": result.summary["runtime"]["vae_mode"]}


def section_generation(kind: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from retrogen.generation.pipelines import PipelineCache

    device = device_of(args)
    s = _gen_settings(kind, args)
    model, built = timed(lambda: build_model(kind, work / kind, device, args.dry_run), "cpu")
    out: dict[str, Any] = {"device": device, "size": s["size"], "steps": s["steps"], "build_s": round(built, 1)}
    env = {"device": device, "cache": PipelineCache(max_entries=1), "compile": args.compile,
           "data": make_dataset(work / f"data-{kind}", 2, 2)}
    from PIL import Image

    base = _diffusers_baseline(model, kind, s, device, Image.open(next(env["data"].rglob("*.jpg"))).convert("RGB"))
    reset_peak(device)
    out.update({f"diffusers_{k}": v for k, v in base.items()})
    # personalised: against the plain text-to-image call (a LoRA adds little compute)
    methods = {"prompt": "text2img", "img2img": "img2img"} | ({"dreambooth": "text2img"} if kind == "sd15" else {})
    for method, baseline in methods.items():
        fig = out[method] = _retrogen_case(method, model, work, s, env)
        fig[f"vs_diffusers_{baseline}"] = round(fig["img_s"] / base[baseline]["img_s"], 2)
    if kind == "sdxl":
        out["personalised"] = "not run: retrogen personalises SD 1.x/2.x only"
    env["cache"].clear()
    return out


def section_training(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from retrogen.generation import GenerationConfig
    from retrogen.generation.models import resolve_model
    from retrogen.generation.runtime import load_pipeline
    from retrogen.generation.training.dreambooth import DreamBoothConfig, train_dreambooth
    from retrogen.generation.training.textual_inversion import TextualInversionConfig, train_textual_inversion

    device = device_of(args)
    size, steps = (64, 2) if args.dry_run else (512, 30)
    model = build_model("sd15", work / "sd15", device, args.dry_run)
    pipe = load_pipeline(resolve_model(str(model)), GenerationConfig(device=device)).pipe
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in sorted(make_dataset(work / "data-train", 1, 3).rglob("*.jpg"))]
    out: dict[str, Any] = {"device": device, "resolution": size}
    trainers = {
        "textual_inversion": lambda n, d: train_textual_inversion(pipe, images, TextualInversionConfig(
            placeholder_token=f"<t{n}>", initializer="thing", resolution=size, num_train_steps=n), d),
        "dreambooth_lora": lambda n, d: train_dreambooth(pipe, images, DreamBoothConfig(
            instance_prompt="a photo of sks thing", class_prompt="a photo of thing", resolution=size,
            num_train_steps=n), d),
    }
    for name, train in trainers.items():
        train(2, Path(tempfile.mkdtemp(dir=work)))  # warm-up (kernels, allocator)
        reset_peak(device)
        meta, seconds = timed(lambda t=train: t(steps, Path(tempfile.mkdtemp(dir=work))), device)
        out[name] = {"steps_s": round(steps / seconds, 2), "steps": steps, "precision": meta["precision"],
                     "peak_gib": peak_gib(device)}
    return out


def _open_clip_dir(name: str, path: Path, dry_run: bool) -> Path:
    """open_clip ``name`` with random weights in the ``local-dir`` layout the tests use (the tiny one when dry)."""
    if (path / "open_clip_config.json").exists():
        return path
    if dry_run:
        from tests.tiny_clip import build_tiny_open_clip

        return build_tiny_open_clip(path)
    import open_clip
    from safetensors.torch import save_file

    model = open_clip.create_model(name, pretrained=None)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": open_clip.get_model_config(name),
           "preprocess_cfg": {"mean": list(getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
                              "std": list(getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)}}
    (path / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return path


def section_clip(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from retrogen.index_builder import IndexBuildConfig, build_index
    from retrogen.retrieval.embedders import create_embedder

    device = device_of(args)
    n = 64 if args.dry_run else 4096
    corpus = make_dataset(work / "corpus", 1, n, size=256 if not args.dry_run else 48)
    out: dict[str, Any] = {"device": device, "images": n}
    for name in ("ViT-B-32", "ViT-L-14"):
        folder = _open_clip_dir(name, work / f"open_clip-{name}", args.dry_run)
        embedder = create_embedder(f"open_clip:local-dir:{folder}", device=device)
        cfg = IndexBuildConfig(index_type="Flat", batch_size=256 if not args.dry_run else 16,
                               num_workers=min(8, os.cpu_count() or 1), shard_size=n)
        reset_peak(device)
        manifest, seconds = timed(lambda e=embedder, nm=name, c=cfg: build_index(
            [str(corpus)], work / f"index-{nm}", embedder=e, config=c, overwrite=True), device)
        build = manifest.build if hasattr(manifest, "build") else {}
        out[name] = {"embed_img_s": (build or {}).get("images_per_s"), "build_img_s": round(n / seconds, 1),
                     "peak_gib": peak_gib(device)}
    out["anchor"] = "clip-retrieval: 1,400-1,500 img/s for ViT-B/32 on one RTX 3080"
    if args.dry_run:
        out["note"] = "dry run: a tiny open_clip model stands in for both"
    return out


def _torch_search(x: Any, q: Any, k: int, chunk: int = 256) -> Any:
    import torch

    return torch.cat([torch.topk(q[i:i + chunk] @ x.T, k, dim=1).indices for i in range(0, len(q), chunk)])


def section_search(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    n, dim, nq, k = (10_000, 64, 64, 10) if args.dry_run else (1_000_000, 768, 4096, 10)
    device = device_of(args)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, dim, device=device, generator=gen), dim=1)
    q = torch.nn.functional.normalize(torch.randn(nq, dim, device=device, generator=gen), dim=1)
    out: dict[str, Any] = {"vectors": n, "dim": dim, "queries": nq, "k": k}
    _torch_search(x, q[:64], k)  # warm-up
    ids, seconds = timed(lambda: _torch_search(x, q, k), device)
    out[f"torch_{device}"] = {"q_s": round(nq / seconds, 1), "note": "torch matmul + top-k, float32"}
    if device == "cuda":  # the same on the CPU, fewer queries
        xc, qc = x.cpu(), q[:256].cpu()
        _, seconds = timed(lambda: _torch_search(xc, qc, k), "cpu")
        out["torch_cpu"] = {"q_s": round(len(qc) / seconds, 1), "threads": torch.get_num_threads()}
        out["gpu_vs_cpu_torch"] = round(out["torch_cuda"]["q_s"] / out["torch_cpu"]["q_s"], 1)
    ok, _ = importable("faiss")
    xs, qs = x.float().cpu().numpy(), q.float().cpu().numpy()
    if ok:
        import faiss

        index = faiss.IndexFlatIP(dim)
        index.add(xs)
        cpu_q = min(nq, 256 if not args.dry_run else nq)
        (_, cpu_ids), seconds = timed(lambda: index.search(qs[:cpu_q], k), "cpu")
        out["faiss_cpu"] = {"q_s": round(cpu_q / seconds, 1), "threads": faiss.omp_get_max_threads(),
                            "agrees_with_torch": bool(np.mean(cpu_ids[:, 0] == ids[:cpu_q, 0].cpu().numpy()) > 0.99)}
        out["faiss_gpu"] = _faiss_gpu(faiss, xs, qs, k) if device == "cuda" else "not run: no GPU"
    else:
        out["faiss_cpu"] = "not run: faiss is not importable here"
        out["faiss_gpu"] = "not run: faiss is not importable here; torch matmul + top-k is the GPU baseline"
    return out


def _faiss_gpu(faiss: Any, xs: Any, qs: Any, k: int) -> Any:
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return "not available: this faiss has no GPU support (faiss-cpu); torch matmul + top-k is the GPU baseline"
    res = faiss.StandardGpuResources()
    index = faiss.index_cpu_to_gpu(res, 0, faiss.IndexFlatIP(xs.shape[1]))
    index.add(xs)
    index.search(qs[:64], k)
    _, seconds = timed(lambda: index.search(qs, k), "cpu")
    return {"q_s": round(len(qs) / seconds, 1)}


# --- driver ---------------------------------------------------------------------------------------------------


RUNNERS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "env": section_env,
    "sd15": lambda a, w: section_generation("sd15", a, w),
    "sdxl": lambda a, w: section_generation("sdxl", a, w),
    "training": section_training,
    "clip": section_clip,
    "search": section_search,
}


def run_section(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The section's figures, or ``{"skipped": why}`` / ``{"error": ...}``; never raises."""
    missing = [m for m in NEEDS.get(name, ()) if not importable(m)[0]]
    if missing:
        return {"skipped": f"needs {', '.join(missing)}, not importable here (carry the wheels: docs/generation.md)"}
    t0 = time.perf_counter()
    try:
        figures = RUNNERS[name](args, work)
    except Skip as e:
        return {"skipped": str(e)}
    except Exception as e:  # noqa: BLE001 - one section failing must not hide the others' figures
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    finally:
        with contextlib.suppress(Exception):
            reset_peak(device_of(args))
    return figures | {"section_s": round(time.perf_counter() - t0, 1)}


def print_section(name: str, figures: dict[str, Any]) -> None:
    if "skipped" in figures or "error" in figures:
        print(f"[{name}] {'SKIPPED' if 'skipped' in figures else 'FAILED'}: {figures.get('skipped') or figures['error']}")
        return
    for key, value in figures.items():
        if isinstance(value, dict):
            print(f"[{name}] {key}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
        else:
            print(f"[{name}] {key}: {value}")
    sys.stdout.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny models and sizes on the CPU (seconds)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}")
    p.add_argument("--json", type=Path, help="write every figure to this JSON file")
    p.add_argument("--workdir", type=Path, help="where models and data are built (default: a temporary folder)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps for SD 1.5 / SDXL")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet in retrogen's paths")
    args = p.parse_args(argv)
    unknown = sorted(set(args.only.split(",")) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def quiet_libraries() -> None:
    """diffusers / transformers warnings (random weights, casts) would bury the figures."""
    for name in ("diffusers", "transformers"):
        with contextlib.suppress(Exception):
            importlib.import_module(f"{name}.utils").logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_retrogen()
    quiet_libraries()
    results: dict[str, Any] = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="retrogen-gpu-check-")))
        work.mkdir(parents=True, exist_ok=True)
        for name in [s for s in SECTIONS if s in args.only.split(",")]:
            results[name] = run_section(name, args, work)
            print_section(name, results[name])
    results["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"[total] {results['total_s']} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
