"""generation: every inference method end to end on the tiny SD model, provenance, determinism, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrogen.fileio import sha256_bytes
from retrogen.outputs import OutputFolder
from retrogen.progress import CancelledError

FAST = dict(num_inference_steps=2, size=64, batch_size=2, num_train_steps=2)
PROV_FIELDS = {
    "file", "label", "method", "sha256", "created", "retrogen_version", "pipeline", "model", "model_revision",
    "weights_hash", "scheduler", "scheduler_class", "prompt", "negative_prompt", "seed", "num_inference_steps",
    "guidance_scale", "strength", "init_image", "init_image_sha256", "adapter", "adapter_hash", "index",
    "device", "dtype", "width", "height", "model_path", "torch_version", "diffusers_version",
}


def make_dataset(root: Path, classes=("cat", "dog"), n=2) -> Path:
    rng = np.random.default_rng(0)
    for c, label in enumerate(classes):
        (root / label).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            arr[..., c % 3] = 255  # classes differ in colour
            Image.fromarray(arr).save(root / label / f"img{i}.png")
    return root


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "data")


def run(dataset, out, model, method, per_class=3, artifacts_dir=None, progress=None, should_cancel=None, **cfg):
    from retrogen.generation import GenerationConfig, augment_by_generation

    return augment_by_generation(dataset, out, model=str(model), method=method, per_class=per_class,
                                 config=GenerationConfig(**(FAST | cfg)), artifacts_dir=artifacts_dir,
                                 progress=progress, should_cancel=should_cancel)


def test_list_methods():
    from retrogen.generation import list_methods

    assert list_methods() == ["dreambooth", "img2img", "prompt", "textual-inversion", "variation"]


@pytest.mark.parametrize("method", ["prompt", "img2img", "variation"])
def test_method_end_to_end_with_provenance(method, dataset, tmp_path, tiny_sd_dir):
    from retrogen.generation import derive_seed

    events = []
    out = tmp_path / "out"
    result = run(dataset, out, tiny_sd_dir, method, progress=events.append)

    # Output folder: ImageFolder + provenance.jsonl + summary.json, records matching the bytes on disk.
    assert result.counts == {"cat": 3, "dog": 3}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["per_class"]["cat"] == {"requested": 3, "returned": 3, "reason": None}
    assert summary["images_per_s"] > 0 and summary["parameters"]["num_inference_steps"] == 2
    records = OutputFolder(out).records()
    assert len(records) == 6 and records == json.loads(json.dumps(result.records))
    for r in records:
        assert PROV_FIELDS <= set(r), PROV_FIELDS - set(r)
        data = (out / r["file"]).read_bytes()
        assert sha256_bytes(data) == r["sha256"]
        assert Image.open(out / r["file"]).size == (64, 64)
        assert r["seed"] == derive_seed(0, r["label"], r["index"])
        assert r["weights_hash"] == summary["model"]["weights_hash"] and len(r["weights_hash"]) == 64
    assert len({r["sha256"] for r in records}) == 6  # every image its own seed
    cat = [r for r in records if r["label"] == "cat"]
    if method == "prompt":
        assert cat[0]["prompt"] == "a photo of a cat" and cat[0]["init_image"] is None
    else:  # round-robin over the class's images
        assert [r["init_image"] for r in cat] == ["cat/img0.png", "cat/img1.png", "cat/img0.png"]
        assert cat[0]["init_image_sha256"] == sha256_bytes((dataset / "cat" / "img0.png").read_bytes())
    if method == "img2img":
        assert cat[0]["strength"] == 0.5 and cat[0]["pipeline"] == "StableDiffusionImg2ImgPipeline"
    if method == "variation":
        assert cat[0]["adapter"].startswith("ip-adapter:") and len(cat[0]["adapter_hash"]) == 64
    # Progress: done/total per class, ending at total.
    gen = [e for e in events if e.stage == "generate"]
    assert [(e.label, e.done, e.total) for e in gen if e.label == "dog"] == [("dog", 0, 3), ("dog", 2, 3), ("dog", 3, 3)]


def test_same_request_same_bytes_and_seeds_independent_of_batch_size(dataset, tmp_path, tiny_sd_dir):
    a = run(dataset, tmp_path / "a", tiny_sd_dir, "prompt", batch_size=3)
    a2 = run(dataset, tmp_path / "a2", tiny_sd_dir, "prompt", batch_size=3)
    b = run(dataset, tmp_path / "b", tiny_sd_dir, "prompt", batch_size=1)
    c = run(dataset, tmp_path / "c", tiny_sd_dir, "prompt", batch_size=3, seed=1)
    sha = lambda res: [r["sha256"] for r in res.records]  # noqa: E731
    assert sha(a) == sha(a2)  # same request -> identical bytes
    assert not set(sha(a)) & set(sha(c))
    # Another batch size gives the same images up to batched-kernel rounding (at most 1/255 per pixel).
    for ra, rb in zip(a.records, b.records, strict=True):
        pa = np.asarray(Image.open(tmp_path / "a" / ra["file"]), dtype=int)
        pb = np.asarray(Image.open(tmp_path / "b" / rb["file"]), dtype=int)
        assert ra["seed"] == rb["seed"] and np.abs(pa - pb).max() <= 1


def test_prompt_options_reach_the_pipeline(dataset, tmp_path, tiny_sd_dir):
    res = run(dataset, tmp_path / "o", tiny_sd_dir, "prompt", per_class=2, scheduler="euler",
              prompt_templates=("ensemble",), negative_prompt="blurry",
              class_prompts={"dog": ["a dog on grass", "a dog at night"]}, class_names={"cat": "tabby cat"})
    by = {(r["label"], r["index"]): r for r in res.records}
    assert by["cat", 0]["prompt"] == "a photo of a tabby cat" and by["cat", 1]["prompt"] == "a close-up photo of a tabby cat"
    assert [by["dog", i]["prompt"] for i in (0, 1)] == ["a dog on grass", "a dog at night"]
    assert by["cat", 0]["scheduler_class"] == "EulerDiscreteScheduler" and by["cat", 0]["negative_prompt"] == "blurry"


def _no_output(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


def test_errors_are_named_and_write_nothing(dataset, tmp_path, tiny_sd_dir):
    from retrogen.errors import RetrogenError
    from retrogen.generation import (
        MethodNeedsImagesError,
        ModelKindError,
        UnknownMethodError,
        UnknownModelError,
        UnknownSchedulerError,
    )
    from retrogen.imageio import BadImageError

    out = tmp_path / "out"
    with pytest.raises(UnknownModelError, match="neither an existing directory"):
        run(dataset, out, "not a model!", "prompt")
    with pytest.raises(UnknownModelError):
        run(dataset, out, tmp_path / "missing" / "dir", "prompt")
    with pytest.raises(UnknownModelError, match="is not in the local Hugging Face cache and the hub is offline"):
        run(dataset, out, "retrogen-tests/no-such-model", "prompt", local_files_only=True, revision="main")
    not_model = tmp_path / "notmodel"
    not_model.mkdir()
    with pytest.raises(ModelKindError, match="model_index.json"):
        run(dataset, out, not_model, "prompt")
    (not_model / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelKindError, match="FluxPipeline"):
        run(dataset, out, not_model, "prompt")
    with pytest.raises(UnknownSchedulerError, match="dpm\\+\\+") as e:
        run(dataset, out, tiny_sd_dir, "prompt", scheduler="nope")
    assert e.value.exit_code == 2 and "unipc" in str(e.value)
    with pytest.raises(UnknownMethodError, match="textual-inversion"):
        run(dataset, out, tiny_sd_dir, "sdedit")
    (dataset / "empty_class").mkdir()
    with pytest.raises(MethodNeedsImagesError, match="empty_class"):
        run(dataset, out, tiny_sd_dir, "img2img")
    (dataset / "empty_class").rmdir()
    (dataset / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(BadImageError, match=f"^{dataset / 'cat' / 'broken.jpg'}: not a usable image \\(not_an_image"):
        run(dataset, out, tiny_sd_dir, "img2img")
    assert _no_output(out)
    with pytest.raises(RetrogenError, match="strength"):
        run(dataset, out, tiny_sd_dir, "prompt", strength=1.5)


def test_prompt_method_accepts_empty_class_folders(tmp_path, tiny_sd_dir):
    data = tmp_path / "names"
    for label in ("zebra", "yak"):
        (data / label).mkdir(parents=True)
    res = run(data, tmp_path / "out", tiny_sd_dir, "prompt", per_class=1)
    assert res.counts == {"yak": 1, "zebra": 1}


def test_existing_output_is_never_overwritten(dataset, tmp_path, tiny_sd_dir):
    import retrogen.outputs
    from retrogen.generation import OutputExistsError

    assert OutputExistsError is retrogen.outputs.OutputExistsError  # the output folder's own, re-exported
    out = tmp_path / "out"
    run(dataset, out, tiny_sd_dir, "prompt", per_class=1)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputExistsError):
        run(dataset, out, tiny_sd_dir, "prompt", per_class=2)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_overwrite_replaces_an_earlier_output_and_nothing_else(dataset, tmp_path, tiny_sd_dir):
    from retrogen.generation import GenerationConfig, OutputExistsError, augment_by_generation

    out = tmp_path / "out"
    run(dataset, out, tiny_sd_dir, "prompt", per_class=2)
    (out / "cat" / "foreign.png").write_bytes((dataset / "cat" / "img0.png").read_bytes())
    result = augment_by_generation(dataset, out, model=str(tiny_sd_dir), method="img2img", per_class=1,
                                   config=GenerationConfig(**FAST), overwrite=True)
    kept = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert kept == {r["file"] for r in result.records} | {"provenance.jsonl", "summary.json"}, "cleared, not merged"
    assert len(OutputFolder(out).records()) == 2
    # the user's own images are never replaced, overwrite or not
    with pytest.raises(OutputExistsError, match="holds no augmentation output"):
        augment_by_generation(dataset, dataset, model=str(tiny_sd_dir), method="prompt", per_class=1,
                              config=GenerationConfig(**FAST), overwrite=True)
    assert sorted(p.name for p in (dataset / "cat").iterdir()) == ["img0.png", "img1.png"]


def test_summary_and_records_name_the_real_size_model_and_versions(dataset, tmp_path, tiny_sd_dir):
    import diffusers
    import torch

    from retrogen import __version__

    result = run(dataset, tmp_path / "out", tiny_sd_dir, "prompt", per_class=1, size=None)
    summary = OutputFolder(tmp_path / "out").summary()
    native = Image.open(tmp_path / "out" / result.records[0]["file"]).size[0]
    assert summary["parameters"]["size"] == native, "the size used, not the config's None"
    assert summary["model"]["path"] == str(Path(tiny_sd_dir).resolve())
    for r in result.records:
        assert r["model_path"] == str(Path(tiny_sd_dir).resolve()) and Path(r["model_path"]).is_absolute()
        assert r["model_revision"] is None  # a local folder; a hub model records its commit here
        assert (r["torch_version"], r["diffusers_version"]) == (torch.__version__, diffusers.__version__)
        assert r["retrogen_version"] == __version__


def test_cancel_between_batches_leaves_no_summary(dataset, tmp_path, tiny_sd_dir):
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 1  # let the first batch through

    with pytest.raises(CancelledError):
        run(dataset, tmp_path / "out", tiny_sd_dir, "prompt", per_class=4, should_cancel=should_cancel)
    assert not (tmp_path / "out" / "summary.json").exists()
    assert len(OutputFolder(tmp_path / "out").records()) == 2


def test_gpu_out_of_memory_names_the_setting(dataset, tmp_path, tiny_sd_dir, monkeypatch):
    import torch

    import retrogen.generation.augment
    from retrogen.generation import GpuOutOfMemoryError

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(retrogen.generation.augment, "generate_batch", oom)
    with pytest.raises(GpuOutOfMemoryError, match="--batch-size, now 2") as e:
        run(dataset, tmp_path / "out", tiny_sd_dir, "prompt")
    assert "--size, now 64" in str(e.value) and e.value.http_status == 507


def test_weights_hash_is_cached_and_tracks_changes(tmp_path):
    from retrogen.fileio import sha256_tree
    from retrogen.generation.models import _file_hashes, weights_hash

    d = tmp_path / "m"
    (d / "unet").mkdir(parents=True)
    (d / "unet" / "w.safetensors").write_bytes(b"a" * 100)
    (d / "unet" / "config.json").write_text("{}")
    h1 = weights_hash(d)
    assert h1 == sha256_tree(d, ["unet/w.safetensors"])  # the shared tree hash, over the weight files only
    assert weights_hash(d) == h1 and any(k[0].endswith("w.safetensors") for k in _file_hashes)
    (d / "unet" / "config.json").write_text('{"x": 1}')  # not a weight file
    assert weights_hash(d) == h1
    (d / "unet" / "w.safetensors").write_bytes(b"b" * 100)
    assert weights_hash(d) != h1


def test_weights_hash_takes_hub_blob_digests_from_their_names(tmp_path):
    from retrogen.fileio import sha256_tree
    from retrogen.generation.models import file_sha256, weights_hash

    # The hub cache: snapshot files are links to blobs named by their sha256, which is not recomputed.
    name = "ab" * 32
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / name).write_bytes(b"weights")
    snapshot = tmp_path / "snapshots" / "c0ffee" / "unet"
    snapshot.mkdir(parents=True)
    (snapshot / "w.safetensors").symlink_to(tmp_path / "blobs" / name)
    assert file_sha256(snapshot / "w.safetensors") == name
    assert weights_hash(snapshot.parent) == sha256_tree(snapshot.parent, ["unet/w.safetensors"], file_digest=lambda p: name)


def test_config_from_dict_rejects_unknown_keys():
    from retrogen.generation import GenerationConfig, InvalidConfigError

    cfg = GenerationConfig.from_dict({"num_inference_steps": 3, "prompt_templates": ["a {}"]})
    assert cfg.prompt_templates == ("a {}",) and GenerationConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InvalidConfigError, match="unknown generation setting.*valid: .*num_inference_steps"):
        GenerationConfig.from_dict({"steps": 3})
    with pytest.raises(InvalidConfigError, match="exactly once"):
        GenerationConfig(prompt_templates=("no placeholder",))


@pytest.mark.parametrize("bad,field", [
    ({"num_inference_steps": 0}, "num_inference_steps=0"), ({"batch_size": -1}, "batch_size=-1"),
    ({"strength": 0}, "strength=0"), ({"guidance_scale": -1}, "guidance_scale=-1"), ({"size": 60}, "size=60"),
    ({"train_size": 4}, "train_size=4"), ({"dtype": "float8"}, "dtype='float8'"), ({"device": "tpu"}, "device='tpu'"),
    ({"prompt_templates": []}, "prompt_templates=[]"), ({"learning_rate": 0}, "learning_rate=0"),
    ({"instance_token": " "}, "instance_token=' '"), ({"lora_rank": 0}, "lora_rank=0"),
])
def test_config_names_the_bad_setting(bad, field):
    from retrogen.generation import GenerationConfig, InvalidConfigError

    with pytest.raises(InvalidConfigError) as e:
        GenerationConfig.from_dict(bad)
    assert str(e.value).startswith(field) and len(str(e.value).splitlines()) == 1
    with pytest.raises(InvalidConfigError):
        GenerationConfig().replace(**bad)  # a copy is validated like a new config


def test_config_normalises_json_shapes():
    from retrogen.config import LibraryConfig
    from retrogen.generation import GenerationConfig

    cfg = GenerationConfig(class_prompts={"dog": "a dog", "cat": ["a cat", "cats"]}, class_names={"cat": "tabby"},
                           prompt_templates=["a {}", "ensemble"])
    assert isinstance(cfg, LibraryConfig) and cfg.prompt_templates == ("a {}", "ensemble")
    assert cfg.class_prompts == {"dog": ("a dog",), "cat": ("a cat", "cats")}
    d = cfg.to_dict()
    assert d["class_prompts"] == {"dog": ["a dog"], "cat": ["a cat", "cats"]} and d["prompt_templates"] == ["a {}", "ensemble"]
    assert list(d)[:3] == ["num_inference_steps", "guidance_scale", "strength"]  # summary.json's parameter order
    assert cfg.replace(seed=3).seed == 3 and cfg.replace(seed=3).class_prompts == cfg.class_prompts


def test_seeds_and_templates_are_pinned():
    from retrogen.generation import GenerationConfig, derive_seed
    from retrogen.generation.prompts import class_prompts, class_subject
    from retrogen.prompts import GENERATION_TEMPLATES

    # Fixed values: a change here changes every generated image.
    assert derive_seed(0, "cat", 0) == 5535844496924067164 and derive_seed(7, "dog", 12) == 829483658064576643
    cfg = GenerationConfig(prompt_templates=("ensemble", "a photo of a {}", "art of {}"))
    assert class_prompts("golden_retriever", cfg) == [t.format("golden retriever") for t in GENERATION_TEMPLATES] + [
        "art of golden retriever"]
    assert class_prompts("cat", cfg, subject="<tok>")[0] == "a photo of a <tok>"
    assert class_subject("sea-lion", GenerationConfig(class_names={"cat": "tabby"})) == "sea lion"


def test_ip_adapter_spec_resolution(tmp_path, tiny_sd_dir):
    from retrogen.generation import GenerationError
    from retrogen.generation.methods.variation import resolve_ip_adapter

    assert resolve_ip_adapter(None, tiny_sd_dir, "sd") == (str(tiny_sd_dir), "ip_adapter", "ip-adapter.safetensors")
    assert resolve_ip_adapter(None, tmp_path, "sd") == ("h94/IP-Adapter", "models", "ip-adapter_sd15.safetensors")
    assert resolve_ip_adapter("h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors", tmp_path, "sdxl") == (
        "h94/IP-Adapter", "sdxl_models", "ip-adapter_sdxl.safetensors")
    f = tiny_sd_dir / "ip_adapter" / "ip-adapter.safetensors"
    assert resolve_ip_adapter(str(f), tmp_path, "sd") == (str(f.parent), "", f.name)
    with pytest.raises(GenerationError, match="expected a local .safetensors") as e:
        resolve_ip_adapter("h94/IP-Adapter", tmp_path, "sd")
    assert e.value.exit_code == 2


def test_sdxl_runs_inference_methods_and_refuses_personalisation(dataset, tmp_path, tiny_sdxl_dir):
    from retrogen.generation import InvalidConfigError

    pipelines = {}
    for method in ("prompt", "img2img", "variation"):
        out = tmp_path / method
        result = run(dataset, out, tiny_sdxl_dir, method, per_class=1)
        for r in result.records:
            assert sha256_bytes((out / r["file"]).read_bytes()) == r["sha256"]
            assert Image.open(out / r["file"]).size == (64, 64)
        pipelines[method] = {r["pipeline"] for r in result.records}
    assert pipelines == {"prompt": {"StableDiffusionXLPipeline"}, "img2img": {"StableDiffusionXLImg2ImgPipeline"},
                         "variation": {"StableDiffusionXLPipeline"}}
    with pytest.raises(InvalidConfigError, match="supports sd models, not sdxl"):
        run(dataset, tmp_path / "db", tiny_sdxl_dir, "dreambooth", per_class=1)
    assert not (tmp_path / "db").exists()
