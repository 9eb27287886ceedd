"""The evaluation package on small synthetic data where the right answer is known.

Three classes, each a fixed 16x16 pattern under heavy noise; two real shots per class. An augmentation set
drawn from the same distribution with correct labels must help; the same images with shuffled labels must
hurt; a set holding (a near copy of) a test image must be refused. Features are ``pixels:8`` (no model).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrogen.evaluation import EvaluationConfig, FeatureCache, InvalidEvaluationError, LeakageError, evaluate
from retrogen.evaluation.stats import paired_bootstrap_gain
from retrogen.outputs import OutputFolder

CLASSES = ("a", "b", "c")
FAST = dict(embedder="pixels:8", num_seeds=3, num_steps=150)


def make_set(root: Path, per_class, seed: int, *, noise: float = 90.0, shuffle: bool = False) -> Path:
    """ImageFolder of pattern + noise images; ``per_class`` an int or {class: n}."""
    rng = np.random.default_rng(seed)
    patterns = {c: np.random.default_rng(1234).normal(0, 60, (3, 16, 16))[i] for i, c in enumerate(CLASSES)}
    counts = per_class if isinstance(per_class, dict) else {c: per_class for c in CLASSES}
    labels = [c for c in CLASSES for _ in range(counts[c])]
    dest = list(np.random.default_rng(seed + 99).permutation(labels)) if shuffle else labels
    for i, (c, d) in enumerate(zip(labels, dest, strict=True)):
        arr = np.clip(128 + patterns[c] + rng.normal(0, noise, (16, 16)), 0, 255).astype(np.uint8)
        (root / d).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, "L").convert("RGB").save(root / d / f"img{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    t = tmp_path_factory.mktemp("evaldata")
    return {
        "train": make_set(t / "train", 2, 1),
        "test": make_set(t / "test", 40, 2),
        "good": make_set(t / "good", 30, 3),
        "bad": make_set(t / "bad", 30, 3, shuffle=True),
    }


@pytest.fixture(scope="module")
def report(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return evaluate(data["train"], data["test"], {"good": data["good"], "bad": data["bad"]},
                    config=EvaluationConfig(**FAST), out_dir=out), out


def test_correct_labels_help_and_shuffled_labels_hurt(report):
    r, _ = report
    real, good, bad = r.arm("real-only"), r.arm("good"), r.arm("bad")
    assert good.accuracy["mean"] > real.accuracy["mean"] > bad.accuracy["mean"]
    assert good.gain["ci_low"] > 0  # significant help
    assert bad.gain["ci_high"] < 0  # significant harm
    assert good.gain["ci_low"] <= good.gain["mean"] <= good.gain["ci_high"]
    assert len(good.accuracy["per_seed"]) == 3 and good.accuracy["std"] >= 0
    assert set(good.per_class) == set(CLASSES) and all(0 <= v <= 1 for v in good.per_class.values())
    assert good.num_images == 90 and good.counts == {"a": 30, "b": 30, "c": 30}


def test_report_files_complete(report):
    r, out = report
    data = json.loads((out / "report.json").read_text())
    assert [a["name"] for a in data["arms"]] == ["real-only", "good", "bad"]
    assert data["counts"]["test"] == {"a": 40, "b": 40, "c": 40}
    assert data["config"]["embedder"] == "pixels:8" and data["config"]["seeds"] == [0, 1, 2]
    md = (out / "report.md").read_text()
    for arm in r.arms:
        row = next(line for line in md.splitlines() if line.startswith(f"| {arm.name} |"))
        assert f"{100 * arm.accuracy['mean']:.1f} ± {100 * arm.accuracy['std']:.1f}" in row
    with Image.open(out / "report.png") as im:
        assert im.format == "PNG" and im.width > 400


def test_sets_named_train_or_test_do_not_replace_the_real_sets(data, report):
    r = evaluate(data["train"], data["test"], {"train": data["good"], "test": data["bad"]},
                 config=EvaluationConfig(**FAST))
    same = report[0]
    assert r.arm("real-only").accuracy == same.arm("real-only").accuracy
    assert r.arm("train").accuracy == same.arm("good").accuracy and r.arm("test").gain == same.arm("bad").gain


def test_leaking_set_is_refused_and_named(data, tmp_path):
    leak = make_set(tmp_path / "leak", 5, 7)
    src = data["test"] / "b" / "img0045.png"
    arr = np.asarray(Image.open(src), np.int16)
    noisy = np.clip(arr + np.random.default_rng(0).integers(-3, 4, arr.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(leak / "b" / "near_copy.png")  # re-encoded with noise: different bytes
    (leak / "c" / "exact_copy.png").write_bytes((data["test"] / "c" / "img0090.png").read_bytes())
    with pytest.raises(LeakageError) as e:
        evaluate(data["train"], data["test"], {"good": data["good"], "leaky": leak}, config=EvaluationConfig(**FAST))
    pairs = {(x["image"], x["test"]) for x in e.value.leaks}
    assert pairs == {("b/near_copy.png", "b/img0045.png"), ("c/exact_copy.png", "c/img0090.png")}
    assert "leaky:b/near_copy.png" in str(e.value) and "b/img0045.png" in str(e.value)
    # The check can be turned off deliberately.
    r = evaluate(data["train"], data["test"], {"leaky": leak},
                 config=EvaluationConfig(**FAST | {"num_seeds": 1}, enable_leakage_check=False))
    assert r.arm("leaky").num_images == 17


def test_ratio_controls_how_much_a_bad_set_hurts(data):
    cfg = dict(FAST, num_seeds=2)
    low = evaluate(data["train"], data["test"], {"bad": data["bad"]}, config=EvaluationConfig(**cfg, ratio=0.05))
    high = evaluate(data["train"], data["test"], {"bad": data["bad"]}, config=EvaluationConfig(**cfg, ratio=0.9))
    assert high.arm("bad").accuracy["mean"] < low.arm("bad").accuracy["mean"]
    assert low.config["ratio"] == 0.05


def test_cap_per_class_and_unbalanced_warning(data, tmp_path):
    uneven = make_set(tmp_path / "uneven", {"a": 30, "b": 4, "c": 10}, 5)
    r = evaluate(data["train"], data["test"], {"uneven": uneven},
                 config=EvaluationConfig(**FAST | {"num_seeds": 1}))
    assert any("uneven" in w and "'a' has 30" in w for w in r.warnings)
    capped = evaluate(data["train"], data["test"], {"uneven": uneven},
                      config=EvaluationConfig(**FAST | {"num_seeds": 1}, cap_per_class=4))
    assert capped.arm("uneven").counts == {"a": 4, "b": 4, "c": 4}
    assert not capped.warnings


def test_cost_read_from_summary(data, tmp_path):
    out = tmp_path / "gen"
    with OutputFolder.create(out) as w:
        for c in CLASSES:
            for i in range(4):
                w.add(label=c, filename=f"{i}.png", image_bytes=(data["good"] / c / f"img{i + 30 * CLASSES.index(c):04d}.png")
                      .read_bytes(), method="prompt", fields={"device": "cuda"})
        w.close({"method": "prompt", "duration_s": 6.0, "images_per_s": 2.0, "runtime": {"device": "cuda"}})
    r = evaluate(data["train"], data["test"], {"gen": out}, config=EvaluationConfig(**FAST | {"num_seeds": 1}))
    cost = r.arm("gen").cost
    assert cost["seconds_per_image"] == pytest.approx(0.5) and cost["gpu_seconds_per_image"] == pytest.approx(0.5)
    assert cost["images_per_s"] == 2.0 and cost["method"] == "prompt" and cost["has_provenance"]


def test_cnn_classifier_learns_from_a_good_set(data):
    r = evaluate(data["train"], data["test"], {"good": data["good"], "bad": data["bad"]},
                 config=EvaluationConfig(classifier="cnn", embedder="pixels:8", num_seeds=1, num_steps=60))
    assert r.arm("good").accuracy["mean"] > r.arm("bad").accuracy["mean"]
    assert r.arm("good").accuracy["mean"] > 0.6


def test_bad_input_is_a_clear_error(data, tmp_path):
    other = tmp_path / "other"
    (other / "zebra").mkdir(parents=True)
    (other / "zebra" / "x.png").write_bytes((data["good"] / "a" / "img0000.png").read_bytes())
    with pytest.raises(InvalidEvaluationError, match="zebra"):
        evaluate(data["train"], data["test"], {"other": other}, config=EvaluationConfig(**FAST))
    with pytest.raises(InvalidEvaluationError, match="reserved"):
        evaluate(data["train"], data["test"], {"real-only": data["good"]}, config=EvaluationConfig(**FAST))
    # Settings are checked when the config is built (by the CLI, the service or a caller), naming the field.
    for bad in (dict(classifier="svm"), dict(ratio=1.5), dict(num_seeds=0), dict(aug_label_smoothing=1.0)):
        with pytest.raises(InvalidEvaluationError, match=next(iter(bad))):
            EvaluationConfig(**FAST | bad)
    with pytest.raises(InvalidEvaluationError, match="unknown evaluation setting.*'seeds'"):
        EvaluationConfig.from_dict({"seeds": 3})


def test_feature_cache_embeds_each_image_once(data):
    cache = FeatureCache()
    evaluate(data["train"], data["test"], {"good": data["good"]}, config=EvaluationConfig(**FAST | {"num_seeds": 1}),
             cache=cache)
    n = len(cache)
    assert n == 6 + 120 + 90
    evaluate(data["train"], data["test"], {"good": data["good"]}, config=EvaluationConfig(**FAST | {"num_seeds": 1}),
             cache=cache)
    assert len(cache) == n


def test_paired_bootstrap_is_zero_for_identical_arms_and_brackets_a_shift():
    rng = np.random.default_rng(0)
    base = rng.random((3, 200)) < 0.6
    same = paired_bootstrap_gain(base, base)
    assert same["mean"] == same["ci_low"] == same["ci_high"] == 0.0
    better = base | (rng.random((3, 200)) < 0.3)
    g = paired_bootstrap_gain(base, better)
    assert 0 < g["ci_low"] < g["mean"] < g["ci_high"]


def test_cli_writes_reports_and_fails_cleanly(data, tmp_path):
    cmd = [sys.executable, "-c", "from retrogen.cli import main; main()", "evaluate", "--train", str(data["train"]),
           "--test", str(data["test"]), "--embedder", "pixels:8", "--seeds", "2", "--num-steps", "100"]
    ok = subprocess.run(cmd + ["--augment", f"good={data['good']}", "--out", str(tmp_path / "rep")],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "| good | 90 |" in ok.stdout
    assert all((tmp_path / "rep" / f).exists() for f in ("report.json", "report.md", "report.png"))
    bad = subprocess.run(cmd + ["--augment", "nodir"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "NAME=DIR" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
