"""Benchmark: images/s and peak memory per generation method vs plain diffusers, and personalisation time.

Every case runs in its own process (so peak memory is that case's alone) on the same model, steps, size
and batch size. "plain diffusers" is ``StableDiffusionPipeline.from_pretrained(dir)(prompt, ...)`` with the
model's own scheduler and defaults. Models:

- ``tiny``: the tests' random tiny SD (tests/tiny_sd.py), CPU-friendly;
- ``sd15`` / ``sdxl``: the published SD 1.5 / SDXL architectures built from their configs (below) with
  random weights, saved as a standard diffusers folder (speed does not depend on weight values; no download).

    .venv/bin/python bench/bench_generation.py --model tiny
    .venv/bin/python bench/bench_generation.py --model sd15 --size 512 --steps 25 --per-class 4 --batch-size 4

Reported: ``img/s gen`` (generation only), ``img/s e2e`` (incl. model load and training), ``peak MB``
(CUDA: max allocated; CPU: process max RSS), ``train s/class``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.tiny_sd / tests.tiny_clip
# torch's OpenMP threads must not spin against faiss's (see retrogen/__init__.py); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

CASES = ["diffusers", "prompt", "img2img", "variation", "textual-inversion", "dreambooth"]

# Published configs (CompVis/stable-diffusion-v1-4 == runwayml/stable-diffusion-v1-5 architecture).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
# IP-Adapter SD1.5's image encoder: OpenCLIP ViT-H/14 (h94/IP-Adapter models/image_encoder).
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
             image_size=224, projection_dim=1024, hidden_act="gelu")
# stabilityai/stable-diffusion-xl-base-1.0
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SDXL_TEXT2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SDXL_VAE = SD15_VAE | {"sample_size": 1024, "scaling_factor": 0.13025}
SDXL_SCHEDULER = {k: v for k, v in SD15_SCHEDULER.items()  # EulerDiscreteScheduler's share of SD 1.5's
                  if k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "steps_offset")}


def _clip_tokenizer(tmp: Path):
    from transformers import CLIPTokenizer

    from tests.tiny_clip import write_clip_bpe_tokenizer_files

    tmp.mkdir(parents=True, exist_ok=True)
    write_clip_bpe_tokenizer_files(tmp)
    return CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=77)


def build_full_size(kind: str, path: Path) -> Path:
    """SD 1.5 or SDXL from published configs with random weights, saved in fp16 as a diffusers folder."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from safetensors.torch import save_file
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from tests.tiny_sd import tiny_ip_adapter_state_dict

    if (path / "model_index.json").exists():
        return path
    torch.manual_seed(0)
    tok = _clip_tokenizer(path.parent / "tokenizer-src")
    if kind == "sd15":
        unet = UNet2DConditionModel(**SD15_UNET)
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD15_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)), tokenizer=tok,
            unet=unet, scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=CLIPImageProcessor(),
            image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H)), requires_safety_checker=False)
        ip = tiny_ip_adapter_state_dict(unet, image_embed_dim=VIT_H["projection_dim"])
    else:
        unet = UNet2DConditionModel(**SDXL_UNET)
        pipe = StableDiffusionXLPipeline(
            vae=AutoencoderKL(**SDXL_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)), tokenizer=tok,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT2)), tokenizer_2=tok,
            unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER))
        ip = None
    pipe.to(torch.float16).save_pretrained(path, safe_serialization=True)
    if ip is not None:
        (path / "ip_adapter").mkdir()
        save_file({k: v.half().contiguous() for k, v in ip.items()}, str(path / "ip_adapter" / "ip-adapter.safetensors"))
    return path


def _dataset(root: Path, classes: int, images: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(images):
            Image.fromarray(rng.integers(0, 255, (96, 80, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def _peak_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(a: argparse.Namespace) -> dict:
    """One case in this process; returns its figures."""
    import torch

    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    n = a.per_class * a.classes
    t0 = time.perf_counter()
    if a.case == "diffusers":
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        cls = StableDiffusionXLPipeline if a.model == "sdxl" else StableDiffusionPipeline
        pipe = cls.from_pretrained(a.model_dir, dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        t1 = time.perf_counter()
        done = 0
        while done < n:
            k = min(a.batch_size, n - done)
            pipe("a photo of a class0", num_inference_steps=a.steps, height=a.size, width=a.size, num_images_per_prompt=k)
            done += k
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        return {"case": a.case, "images": n, "img_s_gen": n / (t2 - t1), "img_s_e2e": n / (t2 - t0),
                "peak_mb": _peak_mb(device), "train_s_per_class": None}
    from retrogen.generation import GenerationConfig, augment_by_generation

    cfg = GenerationConfig(num_inference_steps=a.steps, size=a.size, batch_size=a.batch_size, num_train_steps=a.train_steps,
                           device=device, train_size=min(a.size, 512))
    out = Path(a.workdir) / f"out-{a.case}-{time.time_ns()}"
    r = augment_by_generation(a.dataset, out, model=a.model_dir, method=a.case, per_class=a.per_class, config=cfg,
                              artifacts_dir=Path(a.workdir) / f"artifacts-{time.time_ns()}")
    s = r.summary
    train = [x["train_s"] for x in s["artifacts"].values()]
    return {"case": a.case, "images": len(r.records), "img_s_gen": len(r.records) / s["timing_s"]["generate"],
            "img_s_e2e": s["images_per_s"], "peak_mb": _peak_mb(device),
            "train_s_per_class": sum(train) / len(train) if train else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "sd15", "sdxl"], default="tiny")
    p.add_argument("--workdir", default="/tmp/retrogen-bench-generation")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.case:
        print("RESULT " + json.dumps(run_case(a)))
        return
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if a.model == "tiny":
        from tests.tiny_sd import build_tiny_sd

        model_dir = build_tiny_sd(work / "tiny-sd") if not (work / "tiny-sd" / "model_index.json").exists() else work / "tiny-sd"
    else:
        model_dir = build_full_size(a.model, work / a.model)
    print(f"model {a.model} at {model_dir} ready in {time.perf_counter() - t:.1f} s")
    dataset = _dataset(work / "data", a.classes, 3)
    base = [sys.executable, __file__, "--model", a.model, "--workdir", str(work), "--steps", str(a.steps), "--size",
            str(a.size), "--per-class", str(a.per_class), "--classes", str(a.classes), "--batch-size", str(a.batch_size),
            "--train-steps", str(a.train_steps), "--device", a.device, "--model-dir", str(model_dir), "--dataset", str(dataset)]
    print(f"{a.model}: {a.steps} steps, {a.size}px, batch {a.batch_size}, {a.per_class} images x {a.classes} classes, "
          f"train {a.train_steps} steps")
    print(f"{'case':<18} {'img/s gen':>10} {'img/s e2e':>10} {'peak MB':>9} {'train s/class':>14} {'gen vs diffusers':>17}")
    rows = {}
    for case in a.cases.split(","):
        proc = subprocess.run(base + ["--case", case], capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{case:<18} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            continue
        r = rows[case] = json.loads(line[7:])
        ratio = r["img_s_gen"] / rows["diffusers"]["img_s_gen"] if "diffusers" in rows else float("nan")
        train = f"{r['train_s_per_class']:.2f}" if r["train_s_per_class"] is not None else "-"
        print(f"{case:<18} {r['img_s_gen']:>10.3f} {r['img_s_e2e']:>10.3f} {r['peak_mb']:>9.0f} {train:>14} {ratio:>16.2f}x")


if __name__ == "__main__":
    main()
