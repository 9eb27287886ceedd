"""Tiny random-weight CLIP models saved in their standard on-disk layouts, for tests and benchmarks.

Both load through the same code path as real models: ``open_clip:local-dir:<dir>`` (open_clip's
``open_clip_config.json`` + ``open_clip_model.safetensors``) and ``hf:<dir>`` (``CLIPModel.save_pretrained``
+ ``CLIPProcessor``). The tokenizers use open_clip's bundled real CLIP BPE vocabulary, so no download.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_tiny_open_clip(path: str | Path, seed: int = 0) -> Path:
    import open_clip
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_OPEN_CLIP_CFG)
    cfg = {
        "model_cfg": TINY_OPEN_CLIP_CFG,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }
    (path / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return path


def write_clip_bpe_tokenizer_files(path: Path) -> None:
    """vocab.json + merges.txt in HF CLIP format, from open_clip's bundled BPE (the real CLIP vocabulary)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    vocab = dict(tok.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair, _ in merges) + "\n")


def build_tiny_hf_clip(path: str | Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "projection_dim": 16},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "projection_dim": 16},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    write_clip_bpe_tokenizer_files(path)
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path
