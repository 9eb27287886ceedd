"""generation personalisation: Textual Inversion and DreamBooth trainers, their artefacts and the cache."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from PIL import Image

from tests.test_generation import make_dataset, run


def _red_images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(np.clip(rng.normal([220, 30, 30], 10, (64, 64, 3)), 0, 255).astype(np.uint8)) for _ in range(2)]


def _generate(pipe, prompt, seed=0):
    import torch

    return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(seed),
                output_type="np").images[0]


def test_trainer_hyperparameters_cover_the_shared_templates():
    from retrogen.generation.training.textual_inversion import TextualInversionConfig
    from retrogen.prompts import TEXTUAL_INVERSION_TEMPLATES

    hp = TextualInversionConfig(placeholder_token="<a>", initializer="cat").hyperparameters()
    assert hp["templates"] == list(TEXTUAL_INVERSION_TEMPLATES) and "placeholder_token" not in hp


def test_textual_inversion_moves_the_token_and_lowers_its_loss(pipe, tmp_path):
    import torch
    from diffusers import DDPMScheduler
    from safetensors.torch import load_file

    from retrogen.generation.training.common import denoising_loss, encode_latents
    from retrogen.generation.training.textual_inversion import TextualInversionConfig, train_textual_inversion

    images, events = _red_images(), []
    cfg = TextualInversionConfig(placeholder_token="<red>", initializer="cat", num_train_steps=30, learning_rate=0.1,
                                 train_batch_size=4, resolution=64)
    meta = train_textual_inversion(pipe, images, cfg, tmp_path, label="red", progress=events.append)
    learned = load_file(tmp_path / "learned_embeds.safetensors")["<red>"]
    assert learned.shape == (1, 32) and "<red>" not in pipe.tokenizer.get_vocab()  # pipeline untouched
    assert events[-1].stage == "train" and events[-1].done == 30 and "loss" in events[-1].extra
    assert len(meta["losses"]) == 30

    # The learned row has moved from its initialiser, and on fixed noise/timesteps it denoises the class better.
    tok, te = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.text_encoder)
    tok.add_tokens(["<red>"])
    te.resize_token_embeddings(len(tok), mean_resizing=False)
    row = tok.convert_tokens_to_ids("<red>")
    table = te.get_input_embeddings().weight
    init = table[tok.encode("cat", add_special_tokens=False)[0]].detach().clone()
    assert (learned[0] - init).norm() > 0.1
    latents = encode_latents(pipe.vae, images, 64, torch.Generator().manual_seed(1))
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def fixed_loss(embedding):
        with torch.no_grad():
            table[row] = embedding
            ids = tok(["a photo of a <red>"] * len(latents), padding="max_length", max_length=77,
                      return_tensors="pt").input_ids
            hidden = te(ids)[0]
            return sum(float(denoising_loss(pipe.unet, noise_scheduler, latents, hidden,
                                            torch.Generator().manual_seed(s)).mean()) for s in range(8))

    assert fixed_loss(learned[0]) < fixed_loss(init) - 1e-4


def test_saved_embedding_reloads_through_diffusers_and_changes_outputs(pipe, tmp_path):
    import torch
    from safetensors.torch import save_file

    from retrogen.generation.training.textual_inversion import TextualInversionConfig, train_textual_inversion

    cfg = TextualInversionConfig(placeholder_token="<obj>", initializer="dog", num_vectors=2, num_train_steps=3,
                                 learning_rate=0.5, resolution=64)
    train_textual_inversion(pipe, _red_images(), cfg, tmp_path)
    p = copy.copy(pipe)
    p.tokenizer, p.text_encoder = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.text_encoder)
    p.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"), token="<obj>")
    learned = _generate(p, "a photo of <obj>")
    # The same two tokens with their initial (untrained) vectors give a different image.
    init = p.text_encoder.get_input_embeddings().weight[p.tokenizer.encode("dog", add_special_tokens=False)[0]]
    other = tmp_path / "init"
    other.mkdir()
    save_file({"<ini>": init.detach().repeat(2, 1).contiguous()}, str(other / "e.safetensors"))
    p.load_textual_inversion(str(other / "e.safetensors"), token="<ini>")
    assert np.abs(learned - _generate(p, "a photo of <ini>")).max() > 1e-3
    assert torch.equal(torch.tensor(learned), torch.tensor(_generate(p, "a photo of <obj>")))


def test_dreambooth_lora_reloads_and_changes_outputs(pipe, tmp_path):
    from safetensors.torch import load_file

    from retrogen.generation.training.dreambooth import LORA_WEIGHT_NAME, DreamBoothConfig, train_dreambooth

    cfg = DreamBoothConfig(instance_prompt="a photo of sks thing", class_prompt="a photo of thing", num_train_steps=3,
                           learning_rate=1e-2, resolution=64, train_text_encoder=True, prior_preservation=True)
    meta = train_dreambooth(pipe, _red_images(), cfg, tmp_path, class_images=_red_images()[:1])
    keys = load_file(tmp_path / LORA_WEIGHT_NAME)
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    assert meta["format"] == "lora" and len(meta["losses"]) == 3
    base = _generate(pipe, "a photo of sks thing")
    assert not getattr(pipe.unet, "peft_config", None)  # trained on a copy
    p = copy.copy(pipe)
    p.unet, p.text_encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    p.load_lora_weights(str(tmp_path), weight_name=LORA_WEIGHT_NAME)
    assert np.abs(_generate(p, "a photo of sks thing") - base).max() > 1e-4


@pytest.mark.parametrize("method,extra", [
    ("textual-inversion", {"enable_img2img": True}),
    ("dreambooth", {}),
    ("dreambooth", {"enable_full_finetune": True, "learning_rate": 1e-3}),
])
def test_personalisation_end_to_end_and_artifact_reuse(method, extra, tmp_path, tiny_sd_dir):
    data = make_dataset(tmp_path / "data")
    arts, events = tmp_path / "artifacts", []
    first = run(data, tmp_path / "a", tiny_sd_dir, method, per_class=2, artifacts_dir=arts, progress=events.append,
                **extra)
    assert first.counts == {"cat": 2, "dog": 2}
    assert {e.label for e in events if e.stage == "train"} == {"cat", "dog"}
    for label, art in first.summary["artifacts"].items():
        assert not art["reused"] and art["loss_first"] is not None
        meta = json.loads((arts / art["kind"] / art["key"] / "artifact.json").read_text())
        assert meta["label"] == label and meta["base_weights_hash"] == first.summary["model"]["weights_hash"]
    rec = first.records[0]
    assert rec["adapter"].split(":")[1] == first.summary["artifacts"]["cat"]["key"]
    assert rec["adapter_hash"] == first.summary["artifacts"]["cat"]["hash"]
    if method == "textual-inversion":
        assert rec["pipeline"] == "StableDiffusionImg2ImgPipeline" and rec["prompt"].startswith("a photo of a <rg-")
    assert not list(arts.rglob("*.tmp"))

    # Same request again: artefacts reused (no training), same bytes.
    events.clear()
    again = run(data, tmp_path / "b", tiny_sd_dir, method, per_class=2, artifacts_dir=arts, progress=events.append,
                **extra)
    assert all(a["reused"] for a in again.summary["artifacts"].values())
    assert not [e for e in events if e.stage == "train"]
    assert [r["sha256"] for r in again.records] == [r["sha256"] for r in first.records]

    # Other hyper-parameters -> another artefact; adding an image to a class -> another artefact for it only.
    Image.new("RGB", (40, 40), (1, 2, 3)).save(data / "cat" / "new.png")
    third = run(data, tmp_path / "c", tiny_sd_dir, method, per_class=1, artifacts_dir=arts, **extra)
    assert not third.summary["artifacts"]["cat"]["reused"] and third.summary["artifacts"]["dog"]["reused"]


def test_artifact_store_is_atomic(tmp_path):
    from retrogen.fileio import sha256_tree
    from retrogen.generation.artifacts import ArtifactStore, artifact_key

    store = ArtifactStore(tmp_path)
    key = artifact_key(kind="k", base_weights_hash="b", image_sha256s=["2", "1"], hyperparameters={"x": 1})
    assert key == artifact_key(kind="k", base_weights_hash="b", image_sha256s=["1", "2"], hyperparameters={"x": 1})
    # Pinned: a changed key format would orphan every stored artefact (they would all train again).
    assert key == "bd526cf93303b2992a332667305bed32977209b632ec55ca0563e5e8cd2fcc12"

    def failing(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-training")

    with pytest.raises(RuntimeError):
        store.get_or_build("k", key, failing, description={})
    assert store.get("k", key) is None and not list((tmp_path / "k").iterdir())
    built = []
    meta, reused = store.get_or_build("k", key, lambda tmp: built.append((tmp / "w.bin").write_bytes(b"w")) or {"n": 1},
                                      description={"label": "cat"})
    assert not reused and meta["n"] == 1 and meta["label"] == "cat"
    assert meta["hash"] == sha256_tree(meta["path"], ["w.bin"])  # the shared tree hash, without artifact.json
    meta2, reused2 = store.get_or_build("k", key, lambda tmp: built.append(1) or {}, description={})
    assert reused2 and meta2["hash"] == meta["hash"] and len(built) == 1


def test_dreambooth_lora_weights_do_not_depend_on_the_global_rng(pipe, tmp_path):
    """peft draws the LoRA's initial weights from torch's global generator; the trainer must seed them itself,
    so the same config trains byte-identical weights whatever the process did before."""
    import torch

    from retrogen.generation.training.dreambooth import LORA_WEIGHT_NAME, DreamBoothConfig, train_dreambooth

    cfg = DreamBoothConfig(instance_prompt="a photo of sks thing", class_prompt="a photo of thing", num_train_steps=2,
                           learning_rate=1e-2, resolution=64, train_text_encoder=True)
    outs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        out = tmp_path / f"run{global_seed}"
        out.mkdir()
        train_dreambooth(pipe, _red_images(), cfg, out)
        outs.append((out / LORA_WEIGHT_NAME).read_bytes())
    assert outs[0] == outs[1]
    after = torch.rand(1)
    torch.manual_seed(2)
    assert torch.equal(after, torch.rand(1)), "the caller's generator is left where it was"


def test_dreambooth_cache_key_follows_what_shapes_the_artefact(tmp_path, tiny_sd_dir):
    data = make_dataset(tmp_path / "data")
    arts = tmp_path / "artifacts"
    base = dict(per_class=1, artifacts_dir=arts, num_train_steps=2)
    first = run(data, tmp_path / "a", tiny_sd_dir, "dreambooth", **base)
    # inference steps and guidance shape the images, not the artefact: reused
    again = run(data, tmp_path / "b", tiny_sd_dir, "dreambooth", **base, num_inference_steps=3, guidance_scale=2.0)
    assert all(a["reused"] for a in again.summary["artifacts"].values())
    assert {a["key"] for a in again.summary["artifacts"].values()} == {a["key"] for a in first.summary["artifacts"].values()}
    # with prior preservation the class images are sampled with them: they shape the artefact
    prior = dict(base, enable_prior_preservation=True, num_class_images=1)
    p1 = run(data, tmp_path / "c", tiny_sd_dir, "dreambooth", **prior)
    p2 = run(data, tmp_path / "d", tiny_sd_dir, "dreambooth", **prior, guidance_scale=2.0)
    assert not any(a["reused"] for a in p2.summary["artifacts"].values())
    assert {a["key"] for a in p1.summary["artifacts"].values()}.isdisjoint(a["key"] for a in p2.summary["artifacts"].values())


def test_orphaned_build_folders_are_removed(tmp_path):
    import os
    import time

    from retrogen.generation.artifacts import ORPHAN_AGE_S, ArtifactStore

    store = ArtifactStore(tmp_path)
    (tmp_path / "dreambooth").mkdir()
    old, young = tmp_path / "dreambooth" / ".abc.x1.tmp", tmp_path / "dreambooth" / ".abc.x2.tmp"
    old.mkdir()
    young.mkdir()
    stale = time.time() - ORPHAN_AGE_S - 10
    os.utime(old, (stale, stale))
    store.get_or_build("dreambooth", "k" * 64, lambda tmp: (tmp / "w.bin").write_bytes(b"w") and {}, description={})
    assert not old.exists() and young.exists(), "a builder that died is cleaned up; one still working is not"
