"""Train the evidence benchmark's small Stable Diffusion on the Fashion-MNIST "pretraining corpus".

The stand-in for SD-trained-on-LAION: a tiny AutoencoderKL, a UNet2DConditionModel and a CLIP text encoder
(with the real CLIP BPE vocabulary bundled in open_clip, so no download), trained from scratch on the train
split with the captions "a photo of a {class name}" (10% dropped to "" so classifier-free guidance works).
Saved with ``StableDiffusionPipeline.save_pretrained`` as a standard diffusers directory, so every
``generation`` method loads it exactly as it loads real SD. Cached: a directory whose ``training.json``
records the same settings is reused.

Outputs in ``--out``: the model directory, ``training.json`` (settings, loss curves, timings),
``loss.png`` (training curves) and ``samples.png`` (one row per class, made through
``generation.augment_by_generation(method="prompt")``).

    .venv/bin/python bench/train_tiny_sd.py --out .retrogen/tiny-fmnist-sd            # ~15 min on 2 CPU cores
    .venv/bin/python bench/train_tiny_sd.py --out /tmp/sd --vae-steps 5 --unet-steps 5  # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.tiny_clip
# torch's OpenMP threads must not spin against faiss's (see retrogen/__init__.py); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("train_tiny_sd")

SIZE = 32  # Fashion-MNIST's 28 px resized to 32 (the VAE halves it: 16x16x4 latents)


@dataclass(frozen=True)
class TrainConfig:
    vae_steps: int = 300
    unet_steps: int = 1500
    batch_size: int = 32
    vae_lr: float = 1e-3
    unet_lr: float = 5e-4
    caption_dropout: float = 0.1
    vae_channels: tuple[int, ...] = (16, 32)
    unet_channels: tuple[int, ...] = (32, 64, 64)
    text_width: int = 64
    num_images: int = 60000  # images of the train split used (all by default)
    max_unet_s: float | None = 660.0  # stop UNet training after this many seconds (the curve records where)
    seed: int = 0
    device: str = "auto"
    version: int = 2


def class_names() -> list[str]:
    from retrogen.fashion_mnist import FASHION_MNIST_CLASSES

    return [c.replace("_", " ") for c in FASHION_MNIST_CLASSES]


def caption(name: str) -> str:
    return f"a photo of a {name}"


def build_components(cfg: TrainConfig, tokenizer_dir: Path):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.tiny_clip import write_clip_bpe_tokenizer_files

    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    write_clip_bpe_tokenizer_files(tokenizer_dir)
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=16)
    torch.manual_seed(cfg.seed)
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=list(cfg.vae_channels),
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        layers_per_block=1, norm_num_groups=8, sample_size=SIZE, mid_block_add_attention=False,
    )
    m = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2 ** (n - 1), in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(cfg.unet_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (m - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (m - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_width, attention_head_dim=8, norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=2 * cfg.text_width,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, clip_sample=False)
    return tokenizer, vae, unet, text_encoder, scheduler


def load_pixels(num_images: int, seed: int):
    """(n, 3, 32, 32) float32 in [-1, 1] and labels, from the Fashion-MNIST train split."""
    import numpy as np
    import torch

    from retrogen.fashion_mnist import load_fashion_mnist

    x, y = load_fashion_mnist("train")
    idx = np.random.default_rng(seed).permutation(len(x))[:num_images]
    # Resized (not padded) to 32 px: generated images then frame the object as the 28 px originals do, and as
    # img2img/personalisation see the user's shots (generation resizes them to the model's size too).
    t = torch.from_numpy(x[idx]).float()[:, None] / 127.5 - 1.0
    t = torch.nn.functional.interpolate(t, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    t = t.clamp(-1, 1).expand(-1, 3, -1, -1).contiguous()
    return t, torch.from_numpy(y[idx])


def train_vae(vae, x, cfg: TrainConfig, device, losses: list[float]) -> None:
    import torch

    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    g = torch.Generator().manual_seed(cfg.seed)
    vae.train()
    for step in range(cfg.vae_steps):
        batch = x[torch.randint(0, len(x), (cfg.batch_size,), generator=g)].to(device)
        post = vae.encode(batch).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / batch[0].numel()
        loss = torch.nn.functional.mse_loss(rec, batch) + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0:
            log.info("vae step %d loss %.4f", step, losses[-1])
    vae.eval()


@dataclasses.dataclass
class UnetCurve:
    losses: list[float]
    seconds: float = 0.0
    steps_done: int = 0


def train_unet(unet, text_encoder, tokenizer, vae, scheduler, x, y, cfg: TrainConfig, device, curve: UnetCurve):
    import torch
    import torch.nn.functional as F

    names = class_names()
    ids = tokenizer([caption(n) for n in names] + [""], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():  # latents once (the VAE is frozen now)
        latents = torch.cat([vae.encode(x[i : i + 512].to(device)).latent_dist.mean for i in range(0, len(x), 512)])
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    latents = latents * scale
    log.info("latents %s, scaling_factor %.4f", tuple(latents.shape), scale)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    warmup = max(1, cfg.unet_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to 10%
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(1.0, s / cfg.unet_steps))))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    unet.train()
    text_encoder.train()
    t0 = time.perf_counter()
    y = y.to(device)
    for step in range(cfg.unet_steps):
        b = torch.randint(0, len(latents), (cfg.batch_size,), generator=g).to(device)
        cap = y[b].clone()
        cap[torch.rand(cfg.batch_size, generator=g).to(device) < cfg.caption_dropout] = len(names)  # "" (CFG)
        z = latents[b]
        noise = torch.randn(z.shape, generator=g).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(b),), generator=g).to(device)
        hidden = text_encoder(ids[cap])[0]
        pred = unet(scheduler.add_noise(z, noise, t), t, hidden).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        curve.losses.append(float(loss.detach()))
        curve.steps_done = step + 1
        curve.seconds = time.perf_counter() - t0
        if step % 100 == 0:
            log.info("unet step %d loss %.4f (%.0fs)", step, curve.losses[-1], curve.seconds)
        if cfg.max_unet_s is not None and curve.seconds > cfg.max_unet_s:
            log.info("time budget reached after %d UNet steps", step + 1)
            break
    unet.eval()
    text_encoder.eval()


def save_model(out: Path, tokenizer, vae, unet, text_encoder) -> Path:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            num_train_timesteps=1000, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae.cpu(), text_encoder=text_encoder.cpu(), tokenizer=tokenizer,
                                   unet=unet.cpu(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    model_dir = out / "model"
    pipe.save_pretrained(model_dir, safe_serialization=True)
    return model_dir


def plot_curves(out: Path, vae_losses: list[float], unet_losses: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def smooth(v, k=25):
        v = np.asarray(v, float)
        return np.convolve(v, np.ones(k) / k, mode="valid") if len(v) > k else v

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, v, title in ((axes[0], vae_losses, "VAE (MSE + KL)"), (axes[1], unet_losses, "UNet (noise MSE)")):
        ax.plot(v, alpha=0.3, lw=0.8)
        ax.plot(np.arange(len(smooth(v))) + (len(v) - len(smooth(v))), smooth(v), lw=1.5)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)


def sample_grid(out: Path, model_dir: Path, per_class: int = 8, steps: int = 25) -> dict:
    """Generate ``per_class`` images per class through ``generation`` (method prompt) and tile them."""
    from PIL import Image

    from retrogen.fashion_mnist import FASHION_MNIST_CLASSES
    from retrogen.generation import GenerationConfig, augment_by_generation

    with tempfile.TemporaryDirectory() as tmp:
        ds = Path(tmp) / "classes"
        for c in FASHION_MNIST_CLASSES:
            (ds / c).mkdir(parents=True)
        cfg = GenerationConfig(num_inference_steps=steps, guidance_scale=3.0, batch_size=per_class, seed=0,
                               class_names={c: c.replace("_", " ") for c in FASHION_MNIST_CLASSES})
        result = augment_by_generation(ds, Path(tmp) / "gen", model=str(model_dir), method="prompt",
                                       per_class=per_class, config=cfg)
        grid = Image.new("RGB", (SIZE * per_class, SIZE * len(FASHION_MNIST_CLASSES)), "white")
        for r, c in enumerate(FASHION_MNIST_CLASSES):
            for i in range(per_class):
                grid.paste(Image.open(Path(tmp) / "gen" / c / f"{i:05d}.png").convert("RGB"), (SIZE * i, SIZE * r))
        grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(out / "samples.png")
        return {"duration_s": result.summary["duration_s"], "images_per_s": result.summary["images_per_s"],
                "guidance_scale": 3.0, "num_inference_steps": steps}


def train(cfg: TrainConfig, out: Path, *, force: bool = False) -> Path:
    """Train (or reuse) the model under ``out``; returns the diffusers model directory."""
    import torch

    record_path = out / "training.json"
    settings = dataclasses.asdict(cfg)
    if not force and record_path.exists() and (out / "model" / "model_index.json").exists():
        if json.loads(record_path.read_text()).get("config") == json.loads(json.dumps(settings)):
            log.info("reusing %s (same settings)", out / "model")
            return out / "model"
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer, vae, unet, text_encoder, scheduler = build_components(cfg, Path(tok_dir))
    vae, unet, text_encoder = vae.to(device), unet.to(device), text_encoder.to(device)
    x, y = load_pixels(cfg.num_images, cfg.seed)
    vae_losses: list[float] = []
    train_vae(vae, x, cfg, device, vae_losses)
    vae_s = time.perf_counter() - t0
    vae.requires_grad_(False)
    curve = UnetCurve([])
    train_unet(unet, text_encoder, tokenizer, vae, scheduler, x, y, cfg, device, curve)
    model_dir = save_model(out, tokenizer, vae, unet, text_encoder)
    plot_curves(out, vae_losses, curve.losses)
    samples = sample_grid(out, model_dir)
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in
                (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))}
    record = {
        "config": settings, "device": str(device), "torch_threads": torch.get_num_threads(),
        "parameters": n_params, "vae_s": round(vae_s, 1), "unet_s": round(curve.seconds, 1),
        "unet_steps_done": curve.steps_done, "total_s": round(time.perf_counter() - t0, 1),
        "vae_loss": vae_losses, "unet_loss": curve.losses, "samples": samples,
        "captions": [caption(n) for n in class_names()],
    }
    record_path.write_text(json.dumps(record))
    log.info("saved %s in %.0fs (%s)", model_dir, record["total_s"], n_params)
    return model_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(".retrogen/tiny-fmnist-sd"))
    for f in dataclasses.fields(TrainConfig):
        if f.type in ("int", "float", "str", "float | None") and f.name != "version":
            kind = {"int": int, "float": float, "str": str, "float | None": float}[f.type]
            p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    p.add_argument("--force", action="store_true", help="Retrain even when a cached model matches.")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("retrogen.generation").setLevel(logging.WARNING)
    kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(a, f.name)}
    model_dir = train(TrainConfig(**kw), a.out, force=a.force)
    rec = json.loads((a.out / "training.json").read_text())
    print(f"model: {model_dir}")
    print(f"trained on {rec['device']} in {rec['total_s']}s (VAE {rec['vae_s']}s, UNet {rec['unet_s']}s, "
          f"{rec['unet_steps_done']} UNet steps); final UNet loss (mean of last 50) "
          f"{sum(rec['unet_loss'][-50:]) / len(rec['unet_loss'][-50:]):.4f}")
    print(f"curves: {a.out / 'loss.png'}; samples: {a.out / 'samples.png'}")


if __name__ == "__main__":
    main()
