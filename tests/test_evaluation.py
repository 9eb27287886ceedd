"""The evaluation package on small synthetic data where the right answer is known.

Three classes, each a fixed 16x16 pattern under heavy noise; a pool of real training images from which each
draw takes two shots per class. An augmentation set drawn from the same distribution with correct labels must
help; the same images with shuffled labels must hurt; copies of test images (in an augmentation set or in the
training images) must be found. Features are ``pixels:8`` (no model).
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
from retrogen.evaluation.stats import paired_interval
from retrogen.outputs import OutputFolder

CLASSES = ("a", "b", "c")
FAST = dict(embedder="pixels:8", num_steps=150)
DRAWN = dict(FAST, shots=2, draws=5)


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
        "train": make_set(t / "train", 8, 1),
        "test": make_set(t / "test", 40, 2),
        "good": make_set(t / "good", 30, 3),
        "bad": make_set(t / "bad", 30, 3, shuffle=True),
    }


@pytest.fixture(scope="module")
def report(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return evaluate(data["train"], data["test"], {"good": data["good"], "bad": data["bad"]},
                    config=EvaluationConfig(**DRAWN, compare=("good,bad",)), out_dir=out), out


def test_correct_labels_help_and_shuffled_labels_hurt_over_draws(report):
    r, _ = report
    real, good, bad = r.arm("real-only"), r.arm("good"), r.arm("bad")
    assert good.accuracy["mean"] > real.accuracy["mean"] > bad.accuracy["mean"]
    assert good.gain["ci_low"] > 0 and bad.gain["ci_high"] < 0  # significant help and harm
    assert good.gain["num_draws"] == 5 and len(good.gain["per_draw"]) == 5 and good.gain["positive_draws"] == 5
    assert len(good.accuracy["per_draw"]) == 5 and good.accuracy["std"] > 0
    assert good.gain["method"].startswith("t(4) over 5 draws")
    (cmp,) = r.comparisons
    assert (cmp["a"], cmp["b"]) == ("good", "bad") and cmp["ci_low"] > 0
    assert set(good.per_class) == set(CLASSES) and all(0 <= v <= 1 for v in good.per_class.values())
    assert good.num_images == 90 and good.counts == {"a": 30, "b": 30, "c": 30}
    assert [d["train_per_class"] for d in r.draws] == [{"a": 2, "b": 2, "c": 2}] * 5
    assert not [w for w in r.warnings if "draw" in w], "five draws: no interval warning"


def test_report_states_the_protocol_and_writes_its_files(report):
    r, out = report
    data = json.loads((out / "report.json").read_text())
    assert [a["name"] for a in data["arms"]] == ["real-only", "good", "bad"]
    assert data["counts"]["test"] == {"a": 40, "b": 40, "c": 40}
    assert data["config"]["embedder"] == "pixels:8" and data["config"]["seeds"] == [0]
    assert all("C" in c and c["rule"].startswith("2-fold cross-validation") for c in data["protocol"]["chosen"])
    assert data["leakage"]["method"] and data["leakage"]["near_copy_residual"] == 0.16
    assert data["arms"][1]["aug_settings"] == {"ratio": None, "aug_label_smoothing": 0.0, "cap_per_class": None}
    md = (out / "report.md").read_text()
    assert md.startswith("Protocol: linear: multinomial logistic regression") and "5 draw(s) of 2" in md
    assert "near-copy residual <= 0.16" in md and "good − bad" in md
    for arm in r.arms:
        row = next(line for line in md.splitlines() if line.startswith(f"| {arm.name} |"))
        assert f"{100 * arm.accuracy['mean']:.1f} ± {100 * arm.accuracy['std']:.1f}" in row
    with Image.open(out / "report.png") as im:
        assert im.format == "PNG" and im.width > 900


def test_sets_named_train_or_test_do_not_replace_the_real_sets(data, report):
    r = evaluate(data["train"], data["test"], {"train": data["good"], "test": data["bad"]},
                 config=EvaluationConfig(**DRAWN))
    same = report[0]
    assert r.arm("real-only").accuracy == same.arm("real-only").accuracy
    assert r.arm("train").accuracy == same.arm("good").accuracy and r.arm("test").gain == same.arm("bad").gain


def _leaky_set(data, root: Path) -> Path:
    leak = make_set(root, 5, 7)
    src = data["test"] / "b" / "img0045.png"
    arr = np.asarray(Image.open(src), np.int16)
    noisy = np.clip(arr + np.random.default_rng(0).integers(-3, 4, arr.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(leak / "b" / "near_copy.png")  # re-encoded with noise: different bytes
    (leak / "c" / "exact_copy.png").write_bytes((data["test"] / "c" / "img0090.png").read_bytes())
    return leak


def test_copies_of_test_images_are_refused_with_every_pair_named(data, tmp_path):
    leak = _leaky_set(data, tmp_path / "leak")
    with pytest.raises(LeakageError) as e:
        evaluate(data["train"], data["test"], {"good": data["good"], "leaky": leak},
                 config=EvaluationConfig(**FAST), out_dir=tmp_path / "out")
    pairs = {(x["set"], x["image"], x["test"], x["kind"]) for x in e.value.leaks}
    assert pairs == {("leaky", "b/near_copy.png", "b/img0045.png", "near"),
                     ("leaky", "c/exact_copy.png", "c/img0090.png", "bytes")}
    assert "leaky:b/near_copy.png ~ test:b/img0045.png (near" in str(e.value)
    assert len(json.loads((tmp_path / "out" / "leaks.json").read_text())["pairs"]) == 2
    # The check can be turned off deliberately.
    r = evaluate(data["train"], data["test"], {"leaky": leak}, config=EvaluationConfig(**FAST, enable_leakage_check=False))
    assert r.arm("leaky").num_images == 17


def test_exclude_drops_copies_from_every_arm_and_reports_them(data, tmp_path):
    leak = _leaky_set(data, tmp_path / "leak")
    train = tmp_path / "train"
    for p in data["train"].rglob("*.png"):
        (train / p.parent.name).mkdir(parents=True, exist_ok=True)
        (train / p.parent.name / p.name).write_bytes(p.read_bytes())
    (train / "a" / "from_test.png").write_bytes((data["test"] / "a" / "img0003.png").read_bytes())
    r = evaluate(train, data["test"], {"leaky": leak}, config=EvaluationConfig(**FAST, leak_policy="exclude"))
    assert r.arm("leaky").num_images == 15 and sum(r.counts["test"].values()) == 119
    assert r.leakage["found"] == 3 and r.leakage["excluded_test_images"] == ["a/img0003.png"]
    assert r.leakage["pairs_per_set"] == {"train": 1, "leaky": 2}
    assert r.leakage["test_images_per_copying_image"]["leaky"] == {"b/near_copy.png": 1, "c/exact_copy.png": 1}
    assert any("copy training images" in w for w in r.warnings)


def test_distinct_images_are_never_called_copies(data):
    # 120 test images against 270 other images of the same three patterns: no pair may be flagged
    r = evaluate(data["train"], data["test"], {"good": data["good"], "bad": data["bad"]},
                 config=EvaluationConfig(**FAST, leak_candidates=10))
    assert r.leakage["found"] == 0 and r.leakage["checked"] == {"train": 24, "good": 90, "bad": 90}


def test_ratio_controls_how_much_a_bad_set_hurts(data):
    low = evaluate(data["train"], data["test"], {"bad": data["bad"]}, config=EvaluationConfig(**DRAWN, ratio=0.05))
    high = evaluate(data["train"], data["test"], {"bad": data["bad"]}, config=EvaluationConfig(**DRAWN, ratio=0.9))
    assert high.arm("bad").accuracy["mean"] < low.arm("bad").accuracy["mean"]
    assert low.arm("bad").aug_settings["ratio"] == 0.05 and low.arm("real-only").aug_settings is None


def test_cap_per_class_and_unbalanced_warning(data, tmp_path):
    uneven = make_set(tmp_path / "uneven", {"a": 30, "b": 4, "c": 10}, 5)
    r = evaluate(data["train"], data["test"], {"uneven": uneven}, config=EvaluationConfig(**FAST))
    assert any("uneven" in w and "'a' has 30" in w for w in r.warnings)
    capped = evaluate(data["train"], data["test"], {"uneven": uneven}, config=EvaluationConfig(**FAST, cap_per_class=4))
    assert capped.arm("uneven").counts == {"a": 4, "b": 4, "c": 4}
    assert not [w for w in capped.warnings if "unbalanced" in w]


def test_cost_read_from_summary_with_the_index_build_apart(data, tmp_path):
    out = tmp_path / "ret"
    with OutputFolder.create(out) as w:
        for c in CLASSES:
            for i in range(4):
                w.add(label=c, filename=f"{i}.png", image_bytes=(data["good"] / c / f"img{i + 30 * CLASSES.index(c):04d}.png")
                      .read_bytes(), method="retrieval:image", fields={"device": "cuda"})
        w.close({"method": "retrieval:image", "duration_s": 6.0, "images_per_s": 2.0, "runtime": {"device": "cuda"},
                 "index_id": "idx-1", "index_build": {"duration_s": 24.0, "count": 1000}})
    r = evaluate(data["train"], data["test"], {"ret": out}, config=EvaluationConfig(**FAST))
    cost = r.arm("ret").cost
    assert cost["seconds_per_image"] == pytest.approx(0.5) and cost["gpu_seconds_per_image"] == pytest.approx(0.5)
    assert cost["index_build_seconds_per_image"] == pytest.approx(2.0) and cost["method"] == "retrieval:image"


def test_cnn_and_stagewise_classifiers_learn_from_a_good_set(data):
    for classifier in ("cnn", "stagewise"):
        r = evaluate(data["train"], data["test"], {"good": data["good"], "bad": data["bad"]},
                     config=EvaluationConfig(classifier=classifier, embedder="pixels:8", num_seeds=1, num_steps=60))
        assert r.arm("good").accuracy["mean"] > r.arm("bad").accuracy["mean"], classifier
        assert r.protocol["text"].startswith(f"Protocol: {classifier}: a 3-block CNN")
        assert any("one draw and one training run" in w for w in r.warnings)


def test_bad_input_is_a_clear_error_naming_the_file(data, tmp_path):
    other = tmp_path / "other"
    (other / "zebra").mkdir(parents=True)
    (other / "zebra" / "x.png").write_bytes((data["good"] / "a" / "img0000.png").read_bytes())
    with pytest.raises(InvalidEvaluationError, match="zebra"):
        evaluate(data["train"], data["test"], {"other": other}, config=EvaluationConfig(**FAST))
    with pytest.raises(InvalidEvaluationError, match="reserved"):
        evaluate(data["train"], data["test"], {"real-only": data["good"]}, config=EvaluationConfig(**FAST))
    broken = make_set(tmp_path / "broken", 2, 11)
    (broken / "a" / "empty.png").write_bytes(b"")
    (broken / "b" / "garbage.png").write_bytes(b"not an image at all")
    with pytest.raises(InvalidEvaluationError, match=r"broken/a/empty\.png: not a usable image \(empty_file\)"):
        evaluate(data["train"], data["test"], {"broken": broken}, config=EvaluationConfig(**FAST))
    (broken / "a" / "empty.png").unlink()
    with pytest.raises(InvalidEvaluationError, match=r"garbage\.png: .*not_an_image") as e:
        evaluate(data["train"], data["test"], {"broken": broken}, config=EvaluationConfig(**FAST))
    assert "BytesIO" not in str(e.value)
    with pytest.raises(InvalidEvaluationError, match="shots=9 needs .*'a': 8"):
        evaluate(data["train"], data["test"], {}, config=EvaluationConfig(**FAST, shots=9))
    with pytest.raises(InvalidEvaluationError, match=r"compare names unknown arm\(s\) \['nope'\]"):
        evaluate(data["train"], data["test"], {"good": data["good"]}, config=EvaluationConfig(**FAST, compare=("good,nope",)))


def test_settings_are_checked_when_the_config_is_built():
    for bad in (dict(classifier="svm"), dict(ratio=1.5), dict(num_seeds=0), dict(aug_label_smoothing=1.0),
                dict(near_copy_residual=0), dict(compare=("a",))):
        with pytest.raises(InvalidEvaluationError, match=next(iter(bad))):
            EvaluationConfig(**FAST | bad)
    with pytest.raises(InvalidEvaluationError, match="draws > 1 needs shots"):
        EvaluationConfig(draws=3)
    with pytest.raises(InvalidEvaluationError, match="aug_label_smoothing needs a cnn"):
        EvaluationConfig(aug_label_smoothing=0.1)
    with pytest.raises(InvalidEvaluationError, match="unknown evaluation setting.*'seeds'"):
        EvaluationConfig.from_dict({"seeds": 3})


def test_a_train_class_missing_from_the_test_set_is_a_warning_not_nan(data, tmp_path):
    test = tmp_path / "test"
    for p in (data["test"] / "a").glob("*.png"):
        (test / "a").mkdir(parents=True, exist_ok=True)
        (test / "a" / p.name).write_bytes(p.read_bytes())
    r = evaluate(data["train"], test, {}, config=EvaluationConfig(**FAST), out_dir=tmp_path / "rep")
    assert r.arm("real-only").per_class["b"] is None and any("no images of ['b', 'c']" in w for w in r.warnings)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "nan" not in md and "| b | – |" in md


def test_feature_cache_decodes_each_image_once(data):
    cache = FeatureCache()
    evaluate(data["train"], data["test"], {"good": data["good"]}, config=EvaluationConfig(**FAST), cache=cache)
    n = len(cache)
    assert n == 24 + 120 + 90
    evaluate(data["train"], data["test"], {"good": data["good"]}, config=EvaluationConfig(**DRAWN), cache=cache)
    assert len(cache) == n


def test_paired_interval_is_zero_for_identical_arms_and_brackets_a_shift():
    rng = np.random.default_rng(0)
    base = rng.random((4, 3, 200)) < 0.6
    same = paired_interval(base, base)
    assert same["mean"] == same["ci_low"] == same["ci_high"] == 0.0
    better = base | (rng.random((4, 3, 200)) < 0.3)
    g = paired_interval(better, base)
    assert 0 < g["ci_low"] < g["mean"] < g["ci_high"] and g["positive_draws"] == 4


def test_cli_writes_reports_and_fails_cleanly(data, tmp_path):
    cmd = [sys.executable, "-c", "from retrogen.cli import main; main()", "evaluate", "--train", str(data["train"]),
           "--test", str(data["test"]), "--embedder", "pixels:8", "--shots", "2", "--draws", "3"]
    ok = subprocess.run(cmd + ["--augment", f"good={data['good']}", "--out", str(tmp_path / "rep"),
                               "--no-enable-leakage-check"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "| good | 90 |" in ok.stdout and "Copy check: off." in ok.stdout
    assert all((tmp_path / "rep" / f).exists() for f in ("report.json", "report.md", "report.png"))
    bad = subprocess.run(cmd + ["--augment", "nodir"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "NAME=DIR" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
