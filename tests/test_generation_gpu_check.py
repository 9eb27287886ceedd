"""bench/gpu_check.sh: the one GPU check runs end to end on the CPU with --dry-run (tiny models and sizes), and
every section prints figures; its own options are checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "sd15", "sdxl", "training", "clip", "search")


def _numbers(obj) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int | float):
        return [obj]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    return []


def test_dry_run_prints_a_figure_for_every_section(tmp_path):
    out = tmp_path / "figures.json"
    env = os.environ | {"PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--json", str(out),
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, env=env,
                          timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    for section in SECTIONS:
        result = figures[section]
        assert "error" not in result and "skipped" not in result, (section, result)
        assert f"[{section}]" in proc.stdout
    assert figures["env"]["torch"] and figures["env"]["retrogen.generation"] == "ok"
    for kind in ("sd15", "sdxl"):
        for path in ("diffusers_text2img", "diffusers_img2img", "prompt", "img2img"):
            assert figures[kind][path]["img_s"] > 0, (kind, path)
        assert figures[kind]["prompt"]["vs_diffusers_text2img"] > 0
        assert figures[kind]["img2img"]["vs_diffusers_img2img"] > 0
    assert figures["sd15"]["dreambooth"]["img_s"] > 0 and "SD 1.x" in figures["sdxl"]["personalised"]
    assert figures["training"]["textual_inversion"]["steps_s"] > 0
    assert figures["training"]["dreambooth_lora"]["steps_s"] > 0
    assert figures["clip"]["ViT-B-32"]["build_img_s"] > 0 and figures["clip"]["ViT-L-14"]["build_img_s"] > 0
    assert figures["search"]["torch_cpu"]["q_s"] > 0 and "faiss_gpu" in figures["search"]
    assert all(_numbers(figures[s]) for s in SECTIONS[1:])


def test_a_section_that_cannot_run_says_why_instead_of_crashing(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    monkeypatch.setitem(gpu_check.NEEDS, "search", ("torch", "no_such_module_for_the_check"))
    args = gpu_check.parse_args(["--dry-run", "--only", "search"])
    result = gpu_check.run_section("search", args, Path("."))
    gpu_check.print_section("search", result)
    assert "no_such_module_for_the_check" in result["skipped"]
    assert "[search] SKIPPED: needs no_such_module_for_the_check" in capsys.readouterr().out

    def broken(args, work):
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setitem(gpu_check.RUNNERS, "env", broken)
    assert gpu_check.run_section("env", args, Path("."))["error"] == "RuntimeError: no kernel image for this GPU"


def test_unknown_sections_are_refused(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(["--only", "sd15,nope"])
    assert e.value.code == 2
    assert "nope" in capsys.readouterr().err


def test_full_size_architectures_match_the_published_parameter_counts():
    """What the GPU run builds, built on the meta device (no memory, no time): SD 1.5's UNet has 859.5 M
    parameters, SDXL's 2.57 G, as published."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    counts = {}
    for kind in ("sd15", "sdxl"):
        pipe = gpu_check.full_size_pipeline(kind, "meta")
        counts[kind] = round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1)
        assert pipe.unet.device.type == "meta" and pipe.scheduler is not None
    assert counts == {"sd15": 859.5, "sdxl": 2567.5}
