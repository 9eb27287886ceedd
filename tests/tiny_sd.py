"""A tiny random-weight Stable Diffusion model directory, built from configs (no download).

``build_tiny_sd(path)`` writes a standard diffusers model directory (``model_index.json`` + one sub-folder
per component, safetensors weights) that loads through ``StableDiffusionPipeline.from_pretrained`` exactly
as a real SD 1.x checkout does. Sizes follow diffusers' own ``get_dummy_components`` (UNet
``block_out_channels=(4, 8)``, 2-layer CLIP text encoder of width 32), so a 64x64 image takes a fraction of a
second on CPU. The directory also carries:

- ``image_encoder/`` + ``feature_extractor/`` (a tiny ``CLIPVisionModelWithProjection``) for the variation
  method, registered in ``model_index.json`` like diffusers' optional ``image_encoder`` component;
- ``ip_adapter/ip-adapter.safetensors``: a random IP-Adapter (image projection + per-layer ``to_k_ip`` /
  ``to_v_ip``) in the file layout ``load_ip_adapter`` reads, matching this UNet.

The tokenizer is a byte-level CLIP BPE with no merges (one token per character), built in code.
"""

from __future__ import annotations

from pathlib import Path

TINY_SIZE = 64  # pixels; the VAE downsamples by 2, so latents are 32x32
_DIM = 32  # text/image embedding width = UNet cross-attention width


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def build_tiny_tokenizer():
    """A CLIPTokenizer whose vocabulary is every byte symbol, alone and word-final (``</w>``)."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_tiny_components(seed: int = 0) -> dict:
    """The tiny pipeline's components, seeded (same seed -> same weights)."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=TINY_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_DIM,
        norm_num_groups=2,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
        sample_size=TINY_SIZE,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=_DIM,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
        )
    )
    torch.manual_seed(seed)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=_DIM,
            projection_dim=_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=4,
            intermediate_size=37,
        )
    )
    feature_extractor = CLIPImageProcessor(crop_size=32, size=32)
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": feature_extractor,
        "image_encoder": image_encoder,
    }


def tiny_ip_adapter_state_dict(unet, image_embed_dim: int = _DIM, seed: int = 0) -> dict:
    """Random IP-Adapter weights for ``unet`` in the flat safetensors layout (``image_proj.*``, ``ip_adapter.*``).

    Key numbering follows ``UNet2DConditionLoadersMixin._convert_ip_adapter_attn_to_diffusers``: one id per
    attention processor, odd ids for the cross-attention (``attn2``) ones.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    sd = {
        "image_proj.proj.weight": torch.randn(4 * cross, image_embed_dim, generator=g) * 0.1,
        "image_proj.proj.bias": torch.zeros(4 * cross),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = unet.config.block_out_channels[int(name[len("down_blocks.")])]
        sd[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.1
        sd[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.1
        key_id += 2
    return sd


def build_tiny_sd(path: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny SD model directory (and its IP-Adapter) to ``path`` and return it."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    path = Path(path)
    components = build_tiny_components(seed)
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "ip_adapter").mkdir(exist_ok=True)
    sd = tiny_ip_adapter_state_dict(components["unet"], seed=seed)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "ip_adapter" / "ip-adapter.safetensors"))
    return path


def build_tiny_sdxl(path: str | Path, *, seed: int = 0) -> Path:
    """A tiny random SDXL model directory (two text encoders, ``text_time`` conditioning) + its IP-Adapter.

    Sizes follow diffusers' SDXL ``get_dummy_components``: cross-attention width 64 = the two 32-wide text
    encoders' hidden states concatenated; 80 = 6 time ids x 8 + the 32-wide pooled text embedding.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    base = build_tiny_components(seed)
    tokenizer = base["tokenizer"]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=TINY_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=2 * _DIM,
        norm_num_groups=2,
    )
    text_cfg = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=_DIM,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_cfg)
    text_encoder_2 = CLIPTextModelWithProjection(text_cfg)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    vae: AutoencoderKL = base["vae"]
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=build_tiny_tokenizer(), unet=unet, scheduler=scheduler,
        image_encoder=base["image_encoder"], feature_extractor=base["feature_extractor"],
    )
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "ip_adapter").mkdir(exist_ok=True)
    sd = tiny_ip_adapter_state_dict(unet, seed=seed)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "ip_adapter" / "ip-adapter.safetensors"))
    return path


if __name__ == "__main__":  # pragma: no cover - manual helper
    import sys

    print(build_tiny_sd(sys.argv[1]))
