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
