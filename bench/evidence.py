"""The evidence benchmark: does retrieval or generation help a classifier more, and at what cost? (issue 5)

Burg et al. (TMLR 2023) at small scale, on real data, with no weights from outside:

1. Fashion-MNIST's train split is the "pretraining corpus" (webdataset shards captioned "a photo of a {class}",
   labels hidden from retrieval); k shots per class drawn from it are the user's dataset; test images come from
   the test split.
2. A small Stable Diffusion trained on that corpus with those captions (bench/train_tiny_sd.py) stands in for
   SD-on-LAION and runs through the same ``generation`` code as real SD.
3. Arms, each adding the same number of images per class: real only; retrieval (image kNN with the
   EfficientNet-Lite0 embedder, dedup/near-duplicate/leakage filters on, the test set as hold-out);
   generation by prompt; img2img from the shots; textual inversion; DreamBooth-LoRA; and an upper bound of
   extra real labelled images.
4. ``evaluation.evaluate`` trains the linear probe over several seeds and reports accuracy, gain and cost.

Shots are drawn once per k (nested: the 5 shots are among the 10, ...); seeds vary the classifier's training.
Every setting is fixed before looking at test accuracy; nothing is tuned on the test split.

    .venv/bin/python bench/evidence.py --toy                      # seconds to a minute, tiny everything
    .venv/bin/python bench/evidence.py --shots 5,10,20 --per-class 20 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# torch and faiss each ship an OpenMP runtime; PASSIVE keeps their idle threads from spinning against each other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("evidence")

GEN_ARMS = ("prompt", "img2img", "textual-inversion", "dreambooth")
ALL_ARMS = ("retrieval", *GEN_ARMS, "real-extra")
PAPER = [  # Burg et al. 2023, ResNet-50 on 10% of ImageNet, top-1 %
    ("real only (10% ImageNet)", 57.2), ("+ SD prompts", 60.9), ("+ Textual Inversion", 61.0),
    ("+ kNN retrieval from LAION", 62.6), ("20% real (upper bound)", 70.2),
]


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description="Retrieval vs generation on Fashion-MNIST (issue 5's evidence).")
    p.add_argument("--workdir", type=Path, default=Path(".retrogen/evidence"))
    p.add_argument("--shots", default="5,10,20", help="Comma-separated shots per class (k).")
    p.add_argument("--per-class", type=int, default=20, help="Extra images per class in every arm.")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--corpus-size", type=int, default=6000, help="Train-split images in the retrieval corpus.")
    p.add_argument("--test-size", type=int, default=2000, help="Test-split images (stratified).")
    p.add_argument("--embedder", default="efficientnet-lite0:onnx")
    p.add_argument("--model", default=None, help="Diffusers model dir (default: train/reuse the tiny SD).")
    p.add_argument("--sd-dir", type=Path, default=Path(".retrogen/tiny-fmnist-sd"), help="Where the tiny SD is cached.")
    p.add_argument("--arms", default=",".join(ALL_ARMS))
    p.add_argument("--gen-steps", type=int, default=25, help="Sampling steps.")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--train-steps", type=int, default=200, help="Textual inversion / DreamBooth steps per class.")
    p.add_argument("--probe-steps", type=int, default=300, help="Linear-probe optimiser steps.")
    p.add_argument("--leakage-threshold", type=float, default=0.95,
                   help="Cosine for the leakage check (evaluate's, and retrieval's hold-out filter).")
    p.add_argument("--dedup-threshold", type=float, default=0.97, help="Retrieval's near-duplicate filter.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--toy", action="store_true", help="Tiny sizes everywhere: a smoke run.")
    p.add_argument("--collect", action="store_true",
                   help="Only print the table from the report-k*/report.json already in --workdir.")
    a = p.parse_args(argv)
    if a.toy:
        a.shots, a.per_class, a.seeds, a.corpus_size, a.test_size = "2", 2, 2, 200, 50
        a.gen_steps, a.train_steps, a.probe_steps = 2, 2, 50
    a.shots = [int(s) for s in a.shots.split(",")]
    a.arms = [s for s in a.arms.split(",") if s]
    unknown = sorted(set(a.arms) - set(ALL_ARMS))
    if unknown:
        p.error(f"unknown arms {unknown}; valid: {', '.join(ALL_ARMS)}")
    return a


def prepare_data(a, root: Path) -> dict:
    """Test folder, nested shot folders per k, extra-real folders per k, and the corpus shards."""
    import numpy as np

    from retrogen.fashion_mnist import FASHION_MNIST_CLASSES as NAMES
    from retrogen.fashion_mnist import (
        load_fashion_mnist,
        stratified_indices,
        write_corpus_shards,
        write_imagefolder,
    )

    rng = np.random.default_rng(a.seed)
    x_tr, y_tr = load_fashion_mnist("train")
    x_te, y_te = load_fashion_mnist("test")
    kmax = max(a.shots)
    shots_all = stratified_indices(y_tr, kmax, rng)  # kmax per class, class-major order
    by_class = {c: shots_all[y_tr[shots_all] == c] for c in range(len(NAMES))}
    extra = stratified_indices(y_tr, a.per_class, rng, exclude=shots_all)
    rest = np.setdiff1d(np.arange(len(y_tr)), np.concatenate([shots_all, extra]))
    pool = np.sort(rng.choice(rest, size=min(a.corpus_size, len(rest)), replace=False))
    test_idx = stratified_indices(y_te, max(1, a.test_size // len(NAMES)), rng)

    test_dir = root / "test"
    write_imagefolder(x_te[test_idx], y_te[test_idx], test_dir, prefix="test")
    shots = {}
    for k in a.shots:
        idx = np.concatenate([by_class[c][:k] for c in range(len(NAMES))])
        shots[k] = root / f"shots-k{k}"
        write_imagefolder(x_tr[idx], y_tr[idx], shots[k], prefix="shot")
    extra_dir = root / "real-extra"
    write_imagefolder(x_tr[extra], y_tr[extra], extra_dir, prefix="extra")
    keys = [f"fmnist-{i:06d}" for i in pool]
    captions = [f"a photo of a {NAMES[y].replace('_', ' ')}" for y in y_tr[pool]]
    shards = write_corpus_shards(x_tr[pool], captions, keys, root / "corpus")
    return {"test": test_dir, "shots": shots, "extra": extra_dir, "shards": shards, "names": NAMES,
            "corpus_size": len(pool), "test_size": len(test_idx)}


def get_model(a) -> str:
    if a.model:
        return a.model
    import train_tiny_sd as tsd

    cfg = tsd.TrainConfig(vae_steps=3, unet_steps=3, num_images=256, batch_size=8) if a.toy else tsd.TrainConfig()
    out = a.workdir / "tiny-sd" if a.toy else a.sd_dir
    return str(tsd.train(cfg, out))


def build_or_open_index(a, data: dict, emb):
    from retrogen.index_builder.build import build_index
    from retrogen.retrieval.index import CorpusIndex

    index_dir = a.workdir / "index"
    t0 = time.perf_counter()
    build_index([str(s) for s in data["shards"]], index_dir, embedder=emb)  # returns at once when already built
    log.info("index of %d corpus images ready in %.0fs", data["corpus_size"], time.perf_counter() - t0)
    return CorpusIndex.open(index_dir)


def make_arm(arm: str, k: int, a, data: dict, emb, model: str, index) -> Path:
    """The arm's augmentation folder for shots k (reused when already complete)."""
    from retrogen.generation import GenerationConfig, augment_by_generation
    from retrogen.outputs import OutputFolder
    from retrogen.retrieval import RetrievalConfig, augment_by_retrieval

    shots = data["shots"][k]
    if arm == "real-extra":
        return data["extra"]
    # The prompt arm ignores the shots: one set serves every k.
    out = a.workdir / "sets" / (arm if arm == "prompt" else f"{arm}-k{k}")
    if OutputFolder(out).is_complete:
        return out
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    if arm == "retrieval":
        config = RetrievalConfig(dedup_threshold=a.dedup_threshold, leakage_threshold=a.leakage_threshold)
        augment_by_retrieval(shots, out, corpus=index, per_class=a.per_class, mode="image",
                             holdout_dir=data["test"], config=config, embedder=emb)
    else:
        names = {c: c.replace("_", " ") for c in data["names"]}
        cfg = GenerationConfig(num_inference_steps=a.gen_steps, guidance_scale=a.guidance_scale, batch_size=10,
                               seed=a.seed, class_names=names, num_train_steps=a.train_steps)
        augment_by_generation(shots, out, model=model, method=arm, per_class=a.per_class, config=cfg)
    log.info("%s k=%d: %d images/class in %.0fs", arm, k, a.per_class, time.perf_counter() - t0)
    return out


def evaluate_k(k: int, a, data: dict, sets: dict[str, Path], emb, cache) -> tuple:
    """``evaluate`` with the leakage guard on; leaking images an arm produced are set aside and counted."""
    from retrogen.evaluation import EvaluationConfig, LeakageError, evaluate

    cfg = EvaluationConfig(embedder=a.embedder, num_seeds=a.seeds, num_steps=a.probe_steps, seed=a.seed,
                           leakage_threshold=a.leakage_threshold)
    set_aside: dict[str, int] = {}
    for _ in range(3):
        try:
            report = evaluate(data["shots"][k], data["test"], sets, config=cfg, embedder=emb, cache=cache,
                              out_dir=a.workdir / f"report-k{k}")
            return report, set_aside
        except LeakageError as e:
            for leak in e.leaks:  # move the file out of the ImageFolder (hidden folder), as a user would
                src = sets[leak["set"]] / leak["image"]
                dst = sets[leak["set"]] / ".leaked" / leak["image"]
                dst.parent.mkdir(parents=True, exist_ok=True)
                src.replace(dst)
                set_aside[leak["set"]] = set_aside.get(leak["set"], 0) + 1
            log.warning("k=%d: set aside %d leaking images: %s", k, len(e.leaks), str(e)[:300])
    raise RuntimeError("leakage persisted after three passes")


def table(results: list[tuple[int, object, dict]]) -> str:
    lines = ["| k (shots/class) | method | extra/class | top-1 % (mean ± std) | gain pts [95% CI] | s / image |",
             "| --- | --- | --- | --- | --- | --- |"]
    for k, report, aside in results:
        for arm in report.arms:
            per = round(arm.num_images / len(report.classes)) if arm.num_images else 0
            acc = f"{100 * arm.accuracy['mean']:.1f} ± {100 * arm.accuracy['std']:.1f}"
            gain = "–" if arm.gain is None else (f"{100 * arm.gain['mean']:+.1f} [{100 * arm.gain['ci_low']:+.1f}, "
                                                 f"{100 * arm.gain['ci_high']:+.1f}]")
            spi = arm.cost.get("seconds_per_image")
            cost = "–" if spi is None else f"{spi:.3g}"
            note = f" ({aside[arm.name]} leaking set aside)" if aside.get(arm.name) else ""
            lines.append(f"| {k} | {arm.name}{note} | {per} | {acc} | {gain} | {cost} |")
    return "\n".join(lines)


def collect(workdir: Path) -> list[tuple[int, object, dict]]:
    """(k, report, set-aside counts) for every finished report-k*/ in ``workdir``, by k."""
    from retrogen.evaluation import EvaluationReport

    out = []
    for d in sorted(workdir.glob("report-k*"), key=lambda p: int(p.name[8:])):
        if (d / "report.json").exists():
            report = EvaluationReport.load(d)
            aside = {arm.name: len(list(Path(arm.set_dir).glob(".leaked/*/*"))) for arm in report.arms if arm.set_dir}
            out.append((int(d.name[8:]), report, aside))
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("generation", "retrieval", "index_builder", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import diffusers.utils.logging as dlog
    import transformers

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    t0 = time.perf_counter()
    if a.collect:
        print(table(collect(a.workdir)))
        return 0
    a.workdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from retrogen.evaluation import FeatureCache
    from retrogen.retrieval.embedders import create_embedder

    data = prepare_data(a, a.workdir / "data")
    log.info("data: corpus %d, test %d, shots %s, %d extra/class", data["corpus_size"], data["test_size"], a.shots,
             a.per_class)
    emb = create_embedder(a.embedder)
    model = get_model(a) if any(arm in GEN_ARMS for arm in a.arms) else None
    index = build_or_open_index(a, data, emb) if "retrieval" in a.arms else None
    cache = FeatureCache()
    results = []
    for k in a.shots:
        sets = {arm: make_arm(arm, k, a, data, emb, model, index) for arm in a.arms}
        report, aside = evaluate_k(k, a, data, sets, emb, cache)
        results.append((k, report, aside))
    md = table(results)
    settings = {"shots": a.shots, "per_class": a.per_class, "seeds": a.seeds, "corpus_size": data["corpus_size"],
                "test_size": data["test_size"], "embedder": a.embedder, "model": model, "gen_steps": a.gen_steps,
                "guidance_scale": a.guidance_scale, "train_steps": a.train_steps, "probe_steps": a.probe_steps,
                "toy": a.toy, "duration_s": round(time.perf_counter() - t0, 1)}
    (a.workdir / "evidence.md").write_text(md + "\n")
    (a.workdir / "evidence.json").write_text(json.dumps({
        "settings": settings,
        "results": [{"k": k, "set_aside": aside, "report": r.to_dict()} for k, r, aside in results]}, indent=1))
    print(md)
    print("\nBurg et al. 2023 (ResNet-50, 10% ImageNet): " + "; ".join(f"{n} {v}" for n, v in PAPER))
    print(f"\nsettings: {json.dumps(settings)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
