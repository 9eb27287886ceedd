"""``retrogen augment generate``: through typer's CliRunner, main()'s error handling, and one real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retrogen.cli import app
from retrogen.outputs import OutputFolder
from tests.test_generation import make_dataset

FAST = ["--steps", "2", "--size", "64", "--batch-size", "2"]


def test_cli_writes_output_and_summary_line(tmp_path, tiny_sd_dir):
    data, out = make_dataset(tmp_path / "data"), tmp_path / "out"
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"cat": "tabby cat"}))
    res = CliRunner().invoke(app, ["augment", "generate", "--model", str(tiny_sd_dir), "--dataset", str(data),
                                   "--method", "textual-inversion", "--per-class", "2", "--out", str(out), *FAST,
                                   "--train-steps", "2", "--class-names", str(names), "--negative-prompt", "blurry",
                                   "--artifacts-dir", str(tmp_path / "arts"), "--scheduler", "unipc"])
    assert res.exit_code == 0, res.output
    assert "generated 4 images for 2 classes by textual-inversion" in res.output
    assert "artefacts trained 2, reused 0" in res.output
    records = OutputFolder(out).records()
    assert len(records) == 4 and {r["negative_prompt"] for r in records} == {"blurry"}
    assert records[0]["scheduler_class"] == "UniPCMultistepScheduler"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parameters"]["class_names"] == {"cat": "tabby cat"} and summary["parameters"]["num_train_steps"] == 2
    assert len(list((tmp_path / "arts" / "textual-inversion").iterdir())) == 2


@pytest.mark.parametrize("args,error,text", [
    (["--method", "sdedit"], "UnknownMethodError", "valid: dreambooth, img2img, prompt"),
    (["--method", "prompt", "--scheduler", "fast"], "UnknownSchedulerError", "unknown scheduler 'fast'"),
    (["--method", "prompt", "--strength", "2"], "InvalidConfigError", "strength=2.0"),
    (["--method", "prompt", "--model", "/no/such/model"], "UnknownModelError", "neither an existing directory"),
    (["--method", "prompt", "--size", "60"], "InvalidConfigError", "size=60"),
    (["--method", "prompt", "--class-prompts", "/no/such.json"], "InvalidConfigError", "--class-prompts: cannot read"),
    (["--method", "prompt", "--model", "org/not-cached"], "UnknownModelError",
     "'org/not-cached' is not in the local Hugging Face cache and the hub is offline"),
    (["--method", "variation", "--ip-adapter", "retrogen-tests/no-adapter/ip.safetensors"], "InvalidConfigError",
     "cannot load IP-Adapter retrogen-tests/no-adapter/ip.safetensors"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(args, error, text, tmp_path, tiny_sd_dir, monkeypatch, capsys):
    from retrogen.cli import main

    data, out = make_dataset(tmp_path / "data"), tmp_path / "out"
    argv = ["retrogen", "augment", "generate", "--model", str(tiny_sd_dir), "--dataset", str(data), "--per-class",
            "1", "--out", str(out), *args]
    res = CliRunner().invoke(app, argv[1:])
    assert type(res.exception).__name__ == error
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and text in err and err.startswith("error: ")
    assert not out.exists()


@pytest.mark.parametrize("occupant", ["file", "foreign", "bad-image"])
def test_cli_refuses_before_any_model_loads_naming_the_path(occupant, tmp_path, monkeypatch, capsys):
    """--out an existing file, --out holding the user's images, or a bad dataset image: one line, exit 2."""
    import retrogen.generation.augment
    from retrogen.cli import main

    data, out = make_dataset(tmp_path / "my_data"), tmp_path / "out"
    if occupant == "file":
        out.write_text("notes")
    elif occupant == "foreign":
        (out / "cat").mkdir(parents=True)
        (out / "cat" / "mine.png").write_bytes((data / "cat" / "img0.png").read_bytes())
    else:
        (data / "cat" / "3.png").write_bytes(b"")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was resolved before the inputs were checked")

    monkeypatch.setattr(retrogen.generation.augment, "resolve_model", no_model)
    monkeypatch.setattr(sys, "argv", ["retrogen", "augment", "generate", "--model", "org/model", "--dataset",
                                      str(data), "--method", "img2img", "--per-class", "1", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert {"file": f"{out} is a file", "foreign": f"{out} is not empty (cat) and holds no augmentation output",
            "bad-image": f"{data / 'cat' / '3.png'}: not a usable image (empty_file)"}[occupant] in err
    if occupant == "foreign":
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["cat", "cat/mine.png"]


def test_cli_overwrite_clears_an_earlier_output(tmp_path, tiny_sd_dir):
    data, out = make_dataset(tmp_path / "data"), tmp_path / "out"
    args = ["augment", "generate", "--model", str(tiny_sd_dir), "--dataset", str(data), "--method", "prompt",
            "--out", str(out), *FAST]
    assert CliRunner().invoke(app, [*args, "--per-class", "2"]).exit_code == 0
    (out / "dog" / "foreign.png").write_bytes((data / "dog" / "img0.png").read_bytes())
    again = CliRunner().invoke(app, [*args, "--per-class", "1"])
    assert isinstance(again.exception, FileExistsError) and "--overwrite" in str(again.exception)
    res = CliRunner().invoke(app, [*args, "--per-class", "1", "--overwrite"])
    assert res.exit_code == 0, res.output
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["cat/00000.png", "dog/00000.png", "provenance.jsonl", "summary.json"]


def test_installed_command_offline_hub_id_is_one_line(tmp_path):
    import os

    data = make_dataset(tmp_path / "data")
    exe = Path(sys.executable).with_name("retrogen")
    proc = subprocess.run([str(exe), "augment", "generate", "--model", "org/not-cached", "--dataset", str(data),
                           "--method", "prompt", "--per-class", "1", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "not in the local Hugging Face cache" in lines[0] and "hf download org/not-cached" in lines[0]
    assert "local diffusers folder" in lines[0]


def test_installed_command_runs_variation(tmp_path, tiny_sd_dir):
    data, out = make_dataset(tmp_path / "data"), tmp_path / "out"
    exe = Path(sys.executable).with_name("retrogen")
    proc = subprocess.run([str(exe), "augment", "generate", "--model", str(tiny_sd_dir), "--dataset", str(data),
                           "--method", "variation", "--per-class", "2", "--out", str(out), *FAST],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "generated 4 images for 2 classes by variation" in proc.stdout
    assert "generating cat" in proc.stderr  # tqdm bars
    assert sorted(p.name for p in out.iterdir()) == ["cat", "dog", "provenance.jsonl", "summary.json"]


@pytest.mark.parametrize("spelling", ["historical", "derived"])
def test_cli_options_build_the_config(spelling, tmp_path, monkeypatch):
    """Every GenerationConfig field is an option named after it; the historical short flags still work."""
    import retrogen.generation.augment
    from retrogen.generation import GenerationConfig
    from retrogen.outputs import AugmentResult

    seen = {}

    def fake(dataset, out, **kwargs):
        seen.update(kwargs, dataset=dataset, out=out)
        return AugmentResult(out, {"per_class": {}, "artifacts": {}, "duration_s": 1.0, "images_per_s": 0.0})

    monkeypatch.setattr(retrogen.generation.augment, "augment_by_generation", fake)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"dog": "a dog", "cat": ["a cat", "cats"]}))
    names = {"historical": ["--steps", "3", "--guidance", "2", "--train-steps", "5", "--prompt-template", "a {}",
                            "--prompt-template", "ensemble"],
             "derived": ["--num-inference-steps", "3", "--guidance-scale", "2", "--num-train-steps", "5",
                         "--prompt-templates", "a {}", "--prompt-templates", "ensemble"]}[spelling]
    res = CliRunner().invoke(app, ["augment", "generate", "--model", "m", "--dataset", str(tmp_path), "--method",
                                   "prompt", "--per-class", "2", "--out", str(tmp_path / "out"), *names,
                                   "--class-prompts", str(prompts), "--enable-img2img", "--prior-loss-weight", "0.5",
                                   "--artifacts-dir", str(tmp_path / "arts")])
    assert res.exit_code == 0, res.output
    assert seen["config"] == GenerationConfig(
        num_inference_steps=3, guidance_scale=2.0, num_train_steps=5, prompt_templates=("a {}", "ensemble"),
        class_prompts={"dog": ("a dog",), "cat": ("a cat", "cats")}, enable_img2img=True, prior_loss_weight=0.5)
    assert seen["model"] == "m" and seen["per_class"] == 2 and seen["artifacts_dir"] == tmp_path / "arts"
