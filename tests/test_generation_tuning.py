"""generation on a GPU: the batch size chosen from free memory, VAE slicing / tiling from a size up, SDPA attention
in provenance, and a compiled UNet that LoRA hotswap keeps from recompiling per class (a counting backend on the
CPU stands in for inductor)."""

from __future__ import annotations

import pytest
import torch

from tests.test_generation import run

GIB = 1 << 30


@pytest.mark.parametrize("free_gib,size,family,dtype_bytes,expected", [
    (80, 512, "sd", 2, 16),  # plenty: capped
    (10, 512, "sd", 2, 5),  # (10 - 2 reserve) / 1.5
    (10, 512, "sd", 4, 2),  # float32 doubles the cost
    (60, 1024, "sdxl", 2, 6),  # (60 - 6) / (1.5 * 4 * 1.5)
    (1, 1024, "sdxl", 2, 1),  # never below one
])
def test_batch_size_from_free_memory(free_gib, size, family, dtype_bytes, expected, monkeypatch):
    from retrogen.generation.tuning import choose_batch_size

    asked = []

    def mem_get_info(device=None):
        asked.append(device)
        return free_gib * GIB, 141 * GIB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert choose_batch_size(size, family=family, dtype_bytes=dtype_bytes, device="cuda:0") == expected
    assert asked == ["cuda:0"]


def test_auto_batch_size_only_on_cuda_and_only_when_asked(monkeypatch):
    from retrogen.generation import GenerationConfig
    from retrogen.generation.tuning import batch_size_for

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * GIB, 80 * GIB))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto = GenerationConfig(batch_size=3, enable_auto_batch_size=True)
    assert batch_size_for(cuda, torch.float16, 512, "sd", auto) == 16
    assert batch_size_for(cuda, torch.float16, 1024, "sd", auto) == 6  # (40 - 4) / 6
    assert batch_size_for(cpu, torch.float32, 512, "sd", auto) == 3
    assert batch_size_for(cuda, torch.float16, 512, "sd", GenerationConfig(batch_size=3)) == 3


def test_vae_slicing_and_tiling_follow_the_size_and_are_reset_per_call(pipe):
    from retrogen.generation import GenerationConfig
    from retrogen.generation.tuning import configure_vae

    assert configure_vae(pipe, 512, GenerationConfig()) == "full"
    assert not pipe.vae.use_slicing and not pipe.vae.use_tiling
    assert configure_vae(pipe, 1024, GenerationConfig()) == "sliced" and pipe.vae.use_slicing
    assert configure_vae(pipe, 2048, GenerationConfig()) == "sliced+tiled" and pipe.vae.use_tiling
    assert configure_vae(pipe, 64, GenerationConfig(vae_tiling_from=64, vae_slicing_from=4096)) == "tiled"
    assert configure_vae(pipe, 512, GenerationConfig()) == "full"  # a cached pipeline does not keep the last
    assert not pipe.vae.use_slicing and not pipe.vae.use_tiling


def test_provenance_records_sdpa_vae_mode_and_batch_size(tmp_path, tiny_sd_dir):
    from tests.test_generation import make_dataset

    data = make_dataset(tmp_path / "data")
    res = run(data, tmp_path / "out", tiny_sd_dir, "prompt", per_class=2, vae_slicing_from=64)
    r = res.records[0]
    assert (r["attention"], r["sdpa"], r["vae_mode"]) == ("AttnProcessor2_0", True, "sliced")
    assert res.summary["runtime"]["batch_size"] == 2


def test_a_non_sdpa_processor_is_replaced(pipe):
    from diffusers.models.attention_processor import AttnProcessor

    from retrogen.generation.tuning import attention_name, use_sdpa, uses_sdpa

    pipe.unet.set_attn_processor(AttnProcessor())
    assert attention_name(pipe.unet) == "AttnProcessor" and not uses_sdpa(pipe.unet)
    assert use_sdpa(pipe) == "AttnProcessor2_0" and uses_sdpa(pipe.unet)


def _lora(pipe, out, seed):
    from retrogen.generation.training.dreambooth import LORA_WEIGHT_NAME, DreamBoothConfig, train_dreambooth
    from tests.test_generation_training import _red_images

    cfg = DreamBoothConfig(instance_prompt="a photo of sks thing", class_prompt="a photo of thing", resolution=64,
                           num_train_steps=2, learning_rate=5e-2, seed=seed, rank=4)
    out.mkdir()
    train_dreambooth(pipe, _red_images(), cfg, out)
    return str(out), LORA_WEIGHT_NAME


def test_hotswapped_lora_does_not_recompile_the_unet(tiny_sd_dir, tmp_path):
    """Two classes' LoRAs on a compiled UNet: the second swaps into the first's slot, the module and its graph
    stay, the images change. (A counting backend: inductor would compile the same graphs, only slower.)"""
    from diffusers import StableDiffusionPipeline

    from retrogen.generation import GenerationConfig
    from retrogen.generation.tuning import HOTSWAP_ADAPTER, compile_unet, enable_hotswap, load_lora

    p = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    first, second = _lora(p, tmp_path / "a", 0), _lora(p, tmp_path / "b", 1)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        rank = enable_hotswap(p, GenerationConfig(lora_rank=4))
        compile_unet(p, backend=counting)
        unet = p.unet

        def image():
            return p("a photo of sks thing", num_inference_steps=2, height=64, width=64, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]

        assert load_lora(p, *first, hotswap_rank=rank, adapter_name="unused") is False
        a = image()
        compiled = len(graphs)
        assert compiled >= 1
        assert load_lora(p, *second, hotswap_rank=rank, adapter_name="unused") is True
        b = image()
        assert p.unet is unet and list(p.unet.peft_config) == [HOTSWAP_ADAPTER]
        assert len(graphs) == compiled, "hotswapping the second class's LoRA recompiled the UNet"
        assert abs(a - b).max() > 0, "the second LoRA's weights are in use"
        # the counter does see a recompile: unloading and loading (no hotswap) changes the modules
        p.unload_lora_weights()
        load_lora(p, *first, hotswap_rank=None, adapter_name="plain")
        assert abs(image() - a).max() < 1e-5 and len(graphs) > compiled
    finally:
        torch._dynamo.reset()


def test_dreambooth_with_compile_hotswaps_from_the_second_class_on(tmp_path, tiny_sd_dir, monkeypatch):
    """enable_compile end to end: the second class's LoRA is hotswapped (no recompile), the adapter is gone after
    the call, and the images match an uncompiled run's."""
    import retrogen.generation.tuning as tuning
    from tests.test_generation import make_dataset

    graphs, swaps = [], []
    real_compile, real_load = tuning.compile_unet, tuning.load_lora

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(tuning, "compile_unet", lambda pipe: real_compile(pipe, backend=counting))
    monkeypatch.setattr(tuning, "load_lora", lambda *a, **k: swaps.append(real_load(*a, **k)) or swaps[-1])
    data = make_dataset(tmp_path / "data")
    torch._dynamo.reset()
    try:
        compiled = run(data, tmp_path / "c", tiny_sd_dir, "dreambooth", per_class=1, enable_compile=True,
                       artifacts_dir=tmp_path / "arts-c", enable_prior_preservation=True, num_class_images=1, learning_rate=5e-2)
    finally:
        torch._dynamo.reset()
    assert swaps == [False, True] and graphs
    plain = run(data, tmp_path / "p", tiny_sd_dir, "dreambooth", per_class=1, artifacts_dir=tmp_path / "arts-p",
                enable_prior_preservation=True, num_class_images=1, learning_rate=5e-2)
    assert swaps == [False, True, False, False], "without compile: plain loads"
    for rc, rp in zip(compiled.records, plain.records, strict=True):
        # trained separately, to the same bytes: class 2 did not train on top of class 1's loaded LoRA
        assert (rc["adapter"], rc["adapter_hash"]) == (rp["adapter"], rp["adapter_hash"])
    import numpy as np
    from PIL import Image

    for rc, rp in zip(compiled.records, plain.records, strict=True):
        a = np.asarray(Image.open(tmp_path / "c" / rc["file"]), dtype=int)
        b = np.asarray(Image.open(tmp_path / "p" / rp["file"]), dtype=int)
        assert np.abs(a - b).max() <= 1, "a hotswapped LoRA gives the class's own images"
