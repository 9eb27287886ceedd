"""The evidence benchmark: does retrieval or generation help a classifier more, and at what cost? (issues 5, 9)

Burg et al. (TMLR 2023) at small scale, on real data, with no weights from outside, under the evaluation
protocol of ``retrogen.evaluation`` (docs/evaluation.md):

1. Fashion-MNIST's train split holds a *pool* of labelled images per class (the user's side) and, apart from
   it, the "pretraining corpus" (webdataset shards captioned "a photo of a {class}", labels hidden from
   retrieval). Test images come from the test split.
2. For each k (shots per class) and each draw, k shots per class are drawn from the pool, and every arm adds
   ``--per-class`` images per class made *from that draw's shots*: retrieval (image kNN, EfficientNet-Lite0,
   retrogen's filters), retrieval-diverse (the same with the ``diverse`` selection policy), retrieval-caption
   (no shots: corpus captions naming the class, one set for every draw; these captions were written from the
   labels, so caption matching is near an oracle here, which LAION's captions are not), img2img, textual
   inversion and DreamBooth-LoRA (from the small SD trained here on the corpus, bench/train_tiny_sd.py),
   prompt (no shots: one set for every draw), and extra real images from the pool (the upper bound). Text
   retrieval needs an image-text embedder and variation an IP-Adapter; neither is available offline here, so
   those arms are left out (said in the output).
3. ``evaluate_draws`` scores every arm on the same draws: the linear protocol (logistic regression, C chosen
   per draw on the real shots) and the CNN; copies of test images are excluded from every arm (leak policy
   ``exclude``) and counted. Gains are paired per draw, the intervals are over draws (and test items), and
   retrieval is compared with every generation arm.

Compute is the limit on a 2-core CPU, so the arms come in two tiers, each with its own draws (printed in the
output, and in the README's table):

- tier A, every k in ``--shots`` with ``--draws`` draws: real only, the retrievals, prompt, extra real;
- tier B, every k in ``--full-shots`` with ``--full-draws`` draws: every arm (the per-draw generators and
  trainers cost minutes per class);
- the CNN runs on ``--cnn-shots`` with ``--cnn-draws`` draws of each tier (a minute per run here).

Every setting is fixed before looking at test accuracy; nothing is tuned on the test split.
An interrupted run picks up where it stopped: complete sets, and reports of the same config, arms and draws,
are reused.

    .venv/bin/python bench/evidence.py --toy                      # a smoke run, minutes
    .venv/bin/python bench/evidence.py --write-readme             # the README's table and chart (hours)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# torch and faiss each ship an OpenMP runtime; PASSIVE keeps their idle threads from spinning against each other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("evidence")

ROOT = Path(__file__).resolve().parents[1]
RETRIEVAL_ARMS = {"retrieval": "knn", "retrieval-diverse": "diverse"}  # arm -> RetrievalConfig.selection
CAPTION_ARM = "retrieval-caption"  # names only: corpus captions that name the class (REAL / SuS-X's setting)
INDEX_ARMS = (*RETRIEVAL_ARMS, CAPTION_ARM)  # arms that read the index
SHARED_ARMS = ("prompt", CAPTION_ARM)  # arms that use no shots: one set serves every draw
CHEAP_ARMS = (*INDEX_ARMS, "prompt", "real-extra")
GEN_ARMS = ("prompt", "img2img", "textual-inversion", "dreambooth")
ALL_ARMS = (*INDEX_ARMS, *GEN_ARMS, "real-extra")
MISSING_ARMS = {"retrieval by text": "needs an image-text embedder (no CLIP weights offline here)",
                "variation": "needs an IP-Adapter for the project-trained generator (none exists)"}
PAPER = [  # Burg et al. 2023, ResNet-50 on 10% of ImageNet, top-1 %
    ("real only (10% ImageNet)", 57.2), ("+ SD prompts", 60.9), ("+ Textual Inversion", 61.0),
    ("+ kNN retrieval from LAION", 62.6), ("20% real (upper bound)", 70.2),
]
README_BEGIN, README_END = "<!-- evidence:begin -->", "<!-- evidence:end -->"


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description="Retrieval vs generation on Fashion-MNIST, with draws (issue 9).")
    p.add_argument("--workdir", type=Path, default=Path(".retrogen/evidence"))
    p.add_argument("--shots", default="1,3,5,10,20", help="Tier A: shots per class (k), comma-separated.")
    p.add_argument("--draws", type=int, default=10, help="Tier A: draws of the shots per k.")
    p.add_argument("--full-shots", default="1,5,20", help="Tier B (every arm): shots per class.")
    p.add_argument("--full-draws", type=int, default=3, help="Tier B: draws per k.")
    p.add_argument("--cnn-shots", default="1,5,20", help="Where the CNN also runs (both tiers).")
    p.add_argument("--cnn-draws", type=int, default=5, help="The CNN's draws (the first ones of each tier).")
    p.add_argument("--cnn-steps", type=int, default=300, help="The CNN's optimiser steps.")
    p.add_argument("--per-class", type=int, default=20, help="Images per class every arm adds.")
    p.add_argument("--pool-per-class", type=int, default=300, help="Labelled images per class the draws take from.")
    p.add_argument("--corpus-size", type=int, default=6000, help="Train-split images in the retrieval corpus.")
    p.add_argument("--test-size", type=int, default=2000, help="Test-split images (stratified).")
    p.add_argument("--embedder", default="efficientnet-lite0:onnx")
    p.add_argument("--model", default=None, help="Diffusers model dir (default: train/reuse the tiny SD).")
    p.add_argument("--sd-dir", type=Path, default=Path(".retrogen/tiny-fmnist-sd"), help="Where the tiny SD is cached.")
    p.add_argument("--arms", default=",".join(ALL_ARMS))
    p.add_argument("--gen-steps", type=int, default=25, help="Sampling steps.")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--train-steps", type=int, default=100, help="Textual inversion / DreamBooth steps per class.")
    p.add_argument("--leak-candidates", type=int, default=2, help="Test images checked per image for copies.")
    p.add_argument("--dedup-threshold", type=float, default=0.97, help="Retrieval's near-duplicate filter (cosine).")
    p.add_argument("--leakage-threshold", type=float, default=0.95,
                   help="Retrieval's filter against returning the shots themselves (cosine).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--toy", action="store_true", help="Tiny sizes everywhere: a smoke run.")
    p.add_argument("--write-readme", action="store_true", help="Also replace the README's evidence section and "
                   "docs/img/evidence.png, evidence-sets.png.")
    p.add_argument("--collect", action="store_true", help="Only redo the table from the reports in --workdir.")
    a = p.parse_args(argv)
    if a.toy:
        a.shots, a.draws, a.full_shots, a.full_draws, a.cnn_shots, a.cnn_draws = "2", 2, "2", 2, "2", 2
        a.per_class, a.pool_per_class, a.corpus_size, a.test_size = 2, 6, 200, 50
        a.gen_steps, a.train_steps, a.cnn_steps = 2, 2, 20
    for name in ("shots", "full_shots", "cnn_shots"):
        setattr(a, name, [int(s) for s in getattr(a, name).split(",") if s])
    a.arms = [s for s in a.arms.split(",") if s]
    unknown = sorted(set(a.arms) - set(ALL_ARMS))
    if unknown:
        p.error(f"unknown arms {unknown}; valid: {', '.join(ALL_ARMS)}")
    return a


def tiers(a) -> list[dict]:
    """(name, arms, shots, draws) of each tier, with the arms asked for."""
    cheap = [arm for arm in a.arms if arm in CHEAP_ARMS]
    return [t for t in ({"name": "A", "arms": cheap, "shots": a.shots, "draws": a.draws},
                        {"name": "B", "arms": list(a.arms), "shots": a.full_shots, "draws": a.full_draws})
            if t["arms"] and t["shots"]]


def prepare_data(a, root: Path) -> dict:
    """The test folder, the corpus shards, and the labelled pool the draws take their shots from."""
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
    pool = stratified_indices(y_tr, a.pool_per_class, rng)
    rest = np.setdiff1d(np.arange(len(y_tr)), pool)
    corpus = np.sort(rng.choice(rest, size=min(a.corpus_size, len(rest)), replace=False))
    test_idx = stratified_indices(y_te, max(1, a.test_size // len(NAMES)), rng)
    write_imagefolder(x_te[test_idx], y_te[test_idx], root / "test", prefix="test")
    keys = [f"fmnist-{i:06d}" for i in corpus]
    captions = [f"a photo of a {NAMES[y].replace('_', ' ')}" for y in y_tr[corpus]]
    shards = write_corpus_shards(x_tr[corpus], captions, keys, root / "corpus")
    return {"test": root / "test", "shards": shards, "names": NAMES, "x": x_tr, "y": y_tr, "pool": pool,
            "root": root, "corpus_size": len(corpus), "test_size": len(test_idx)}


def draw_folders(a, data: dict, k: int, d: int) -> tuple[Path, Path]:
    """Draw d of k shots per class (and per_class extra real images, disjoint) from the pool: two ImageFolders."""
    import numpy as np

    from retrogen.fashion_mnist import write_imagefolder

    rng = np.random.default_rng([a.seed, k, d])
    x, y, pool = data["x"], data["y"], data["pool"]
    shots, extra = [], []
    for c in range(len(data["names"])):
        mine = rng.permutation(pool[y[pool] == c])
        shots.append(mine[:k])
        extra.append(mine[k : k + a.per_class])
    base = data["root"] / "draws" / f"k{k}" / f"d{d}"
    shots_idx, extra_idx = np.concatenate(shots), np.concatenate(extra)
    write_imagefolder(x[shots_idx], y[shots_idx], base / "shots", prefix="shot")
    write_imagefolder(x[extra_idx], y[extra_idx], base / "extra", prefix="extra")
    return base / "shots", base / "extra"


def get_model(a) -> str:
    if a.model:
        return a.model
    import train_tiny_sd as tsd

    cfg = tsd.TrainConfig(vae_steps=3, unet_steps=3, num_images=256, batch_size=8) if a.toy else tsd.TrainConfig()
    out = a.workdir / "tiny-sd" if a.toy else a.sd_dir
    return str(tsd.train(cfg, out))


def build_index(data: dict, workdir: Path, emb, *, captions: bool = False):
    from retrogen.index_builder.build import build_index as build
    from retrogen.index_builder.build import refresh_metadata
    from retrogen.retrieval.index import CorpusIndex

    t0 = time.perf_counter()
    manifest = build([str(s) for s in data["shards"]], workdir / "index", embedder=emb)  # at once when built
    if captions and not manifest.captions:  # built before caption indexes existed
        refresh_metadata(workdir / "index")
    log.info("index of %d corpus images ready in %.0fs", data["corpus_size"], time.perf_counter() - t0)
    return CorpusIndex.open(workdir / "index")


def make_arm(arm: str, shots: Path, extra: Path, out: Path, *, a, data: dict, emb, model: str | None, index) -> Path:
    """The arm's augmentation folder for one draw (reused when already complete)."""
    from retrogen.generation import GenerationConfig, augment_by_generation
    from retrogen.outputs import OutputFolder
    from retrogen.retrieval import RetrievalConfig, augment_by_retrieval, augment_from_names

    if arm == "real-extra":
        return extra
    if OutputFolder(out).is_complete:
        return out
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    filters = RetrievalConfig(dedup_threshold=a.dedup_threshold, leakage_threshold=a.leakage_threshold)
    if arm in RETRIEVAL_ARMS:
        augment_by_retrieval(shots, out, corpus=index, per_class=a.per_class, mode="image",
                             config=filters.replace(selection=RETRIEVAL_ARMS[arm]), embedder=emb)
    elif arm == CAPTION_ARM:
        augment_from_names(list(data["names"]), out, corpus=index, per_class=a.per_class, mode="caption",
                           config=filters, embedder=emb)
    else:
        names = {c: c.replace("_", " ") for c in data["names"]}
        cfg = GenerationConfig(num_inference_steps=a.gen_steps, guidance_scale=a.guidance_scale, batch_size=10,
                               seed=a.seed, class_names=names, num_train_steps=a.train_steps)
        augment_by_generation(shots, out, model=model, method=arm, per_class=a.per_class, config=cfg)
    log.info("%s %s: %d images/class in %.0fs", arm, out.name, a.per_class, time.perf_counter() - t0)
    return out


def run_cell(a, tier: dict, k: int, *, data: dict, emb, model, index, cache) -> list[dict]:
    """Every arm of one tier at one k over its draws; evaluated with the linear protocol (and the CNN)."""
    from retrogen.evaluation import EvaluationConfig, evaluate_draws

    draws = []
    for d in range(tier["draws"]):
        shots, extra = draw_folders(a, data, k, d)
        sets = {}
        for arm in tier["arms"]:
            out = a.workdir / "sets" / (arm if arm in SHARED_ARMS else f"{arm}/k{k}-d{d}")
            sets[arm] = make_arm(arm, shots, extra, out, a=a, data=data, emb=emb, model=model, index=index)
        draws.append((shots, sets))
    compare = tuple(f"retrieval,{g}" for g in GEN_ARMS if g in tier["arms"] and "retrieval" in tier["arms"])
    compare += tuple(f"{arm},retrieval" for arm in ("retrieval-diverse", CAPTION_ARM)
                     if {"retrieval", arm} <= set(tier["arms"]))
    cells = []
    for classifier in ("linear", "cnn"):
        if classifier == "cnn" and k not in a.cnn_shots:
            continue
        used = draws if classifier == "linear" else draws[: a.cnn_draws]
        cfg = EvaluationConfig(embedder=a.embedder, classifier=classifier, num_seeds=1, num_steps=a.cnn_steps,
                               leak_policy="exclude", leak_candidates=a.leak_candidates, seed=a.seed, compare=compare)
        out = a.workdir / f"report-{tier['name']}-{classifier}-k{k}"
        report = finished_report(out, cfg, used)
        if report is None:
            t0 = time.perf_counter()
            report = evaluate_draws(used, data["test"], config=cfg, embedder=emb, cache=cache, out_dir=out).to_dict()
            log.info("tier %s %s k=%d: %d draws evaluated in %.0fs", tier["name"], classifier, k, len(used),
                     time.perf_counter() - t0)
        cells.append({"tier": tier["name"], "classifier": classifier, "k": k, "report": report})
    return cells


def finished_report(out: Path, cfg, draws: list) -> dict | None:
    """The report an earlier (interrupted) run wrote for this cell, if it evaluated these arms and draws with
    this config and is newer than every set it read; else None (the cell is evaluated again)."""
    path = out / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    same_config = {k: v for k, v in report["config"].items() if k not in ("embedder", "seeds")} == {
        k: v for k, v in cfg.to_dict().items() if k != "embedder"}
    arms = ["real-only", *draws[0][1]]
    # generated/retrieved sets (the draws' real folders are rewritten each run, the same images from the seed)
    made = [Path(p) / "summary.json" for _, s in draws for p in s.values() if (Path(p) / "summary.json").is_file()]
    newer = all(path.stat().st_mtime > m.stat().st_mtime for m in made)
    if same_config and len(report["draws"]) == len(draws) and [x["name"] for x in report["arms"]] == arms and newer:
        log.info("%s: reusing its report (same config, arms and draws)", out.name)
        return report
    return None


def _pts(g: dict | None) -> str:
    if not g:
        return "–"
    return f"{100 * g['mean']:+.1f} [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]"


def table(cells: list[dict], index_build_per_image: float | None) -> str:
    """One row per (classifier, tier, k, arm), then retrieval minus the best generation arm per cell."""
    lines = ["| classifier | tier (draws) | k | arm | top-1 % | gain pts [95% CI] | draws gaining | s / image |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in cells:
        r = c["report"]
        draws = len(r["draws"])
        for arm in r["arms"]:
            spi = arm["cost"].get("seconds_per_image")
            if arm["name"] in INDEX_ARMS and spi is not None and index_build_per_image:
                spi = f"{spi:.3g} + {index_build_per_image:.3g} index"
            elif spi is not None:
                spi = f"{spi:.3g}"
            gaining = f"{arm['gain']['positive_draws']}/{draws}" if arm["gain"] else "–"
            lines.append(f"| {c['classifier']} | {c['tier']} ({draws}) | {c['k']} | {arm['name']} | "
                         f"{100 * arm['accuracy']['mean']:.1f} | {_pts(arm['gain'])} | {gaining} | {spi or '–'} |")
    lines += ["", "Retrieval minus the best generation arm of the same cell (paired per draw):", "",
              "| classifier | tier (draws) | k | best generation arm | retrieval − it, pts [95% CI] |",
              "| --- | --- | --- | --- | --- |"]
    for c in cells:
        r = c["report"]
        gen = [arm for arm in r["arms"] if arm["name"] in GEN_ARMS]
        if not gen or not r["comparisons"]:
            continue
        best = max(gen, key=lambda arm: arm["gain"]["mean"])
        cmp = next(x for x in r["comparisons"] if x["a"] == "retrieval" and x["b"] == best["name"])
        lines.append(f"| {c['classifier']} | {c['tier']} ({len(r['draws'])}) | {c['k']} | {best['name']} | {_pts(cmp)} |")
    for arm, title in (("retrieval-diverse", "Diverse selection"), (CAPTION_ARM, "Caption matching (names only)")):
        rows = [(c, x) for c in cells for x in c["report"]["comparisons"] if (x["a"], x["b"]) == (arm, "retrieval")]
        if rows:
            lines += ["", f"{title} minus kNN image retrieval (paired per draw):", "",
                      f"| classifier | tier (draws) | k | {arm} − retrieval, pts [95% CI] |", "| --- | --- | --- | --- |"]
            lines += [f"| {c['classifier']} | {c['tier']} ({len(c['report']['draws'])}) | {c['k']} | {_pts(x)} |"
                      for c, x in rows]
    return "\n".join(lines)


def chart(cells: list[dict], path: Path) -> None:
    """Gain over real only against k, per arm, with its interval; one panel per classifier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classifiers = sorted({c["classifier"] for c in cells}, key=["linear", "cnn"].index)
    fig, axes = plt.subplots(1, len(classifiers), figsize=(6.5 * len(classifiers), 4.2), squeeze=False)
    for ax, clf in zip(axes[0], classifiers, strict=True):
        arms: dict[str, list] = {}
        for c in cells:
            if c["classifier"] != clf:
                continue
            for arm in c["report"]["arms"]:
                if arm["gain"] and (c["tier"] == "A" or arm["name"] not in CHEAP_ARMS):
                    arms.setdefault(arm["name"], []).append((c["k"], arm["gain"]))
        for i, (name, points) in enumerate(sorted(arms.items())):
            points.sort()
            ks = [k * (1 + 0.03 * (i - 2)) for k, _ in points]  # a small offset per arm keeps the bars apart
            g = [100 * p["mean"] for _, p in points]
            err = [[100 * (p["mean"] - p["ci_low"]) for _, p in points], [100 * (p["ci_high"] - p["mean"]) for _, p in points]]
            ax.errorbar(ks, g, yerr=err, marker="o", capsize=3, label=name)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("shots per class (k)")
        ax.set_ylabel("gain over real only, top-1 points (95% CI over draws)")
        ax.set_title(f"{clf} classifier")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sets_figure(workdir: Path, settings: dict, path: Path, *, per: int = 3, cell: int = 48) -> None:
    """What each arm added at the last tier's smallest k, draw 0: a row per arm, ``per`` images of every other
    class (the real shots on top)."""
    from PIL import Image, ImageDraw

    tier = settings["tiers"][-1]
    k = min(tier["shots"])
    draw = workdir / "data" / "draws" / f"k{k}" / "d0"
    sets = workdir / "sets"
    rows = [(f"real shots (k={k})", draw / "shots")] + [
        (arm, draw / "extra" if arm == "real-extra" else sets / (arm if arm in SHARED_ARMS else f"{arm}/k{k}-d0"))
        for arm in tier["arms"]]
    classes = sorted(p.name for p in (draw / "shots").iterdir() if p.is_dir())[::2]
    label_w, gap = 130, 8
    img = Image.new("RGB", (label_w + len(classes) * (per * cell + gap), 20 + len(rows) * (cell + 4)), "white")
    pen = ImageDraw.Draw(img)
    for j, c in enumerate(classes):
        pen.text((label_w + j * (per * cell + gap), 4), c, fill="black")
    for i, (name, folder) in enumerate(rows):
        y = 20 + i * (cell + 4)
        pen.text((4, y + cell // 2 - 5), name, fill="black")
        for j, c in enumerate(classes):
            for n, f in enumerate(sorted((folder / c).glob("*.*"))[:per]):
                with Image.open(f) as im:
                    img.paste(im.convert("RGB").resize((cell, cell)), (label_w + j * (per * cell + gap) + n * cell, y))
    img.save(path, optimize=True)


def write_readme(md: str, chart_path: Path) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"README.md has no {README_BEGIN} ... {README_END} section to replace")
    block = f"{README_BEGIN}\n{md}\n\n![evidence](docs/img/evidence.png)\n{README_END}"
    readme.write_text(re.sub(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), lambda _m: block, text,
                             flags=re.S))
    shutil.copyfile(chart_path, ROOT / "docs" / "img" / "evidence.png")
    shutil.copyfile(chart_path.with_name("evidence-sets.png"), ROOT / "docs" / "img" / "evidence-sets.png")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("retrogen", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    a.workdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if a.collect:
        result = json.loads((a.workdir / "evidence.json").read_text())
    else:
        result = run(a)
        result["settings"]["duration_s"] = round(time.perf_counter() - t0, 1)
        (a.workdir / "evidence.json").write_text(json.dumps(result, indent=1))
    md = table(result["cells"], result["settings"].get("index_build_seconds_per_image"))
    missing = MISSING_ARMS | {arm: "not among this run's --arms" for arm in ALL_ARMS
                              if arm not in result["settings"]["arms"]}
    md += "\n\nNot run: " + "; ".join(f"{arm} ({why})" for arm, why in missing.items()) + "."
    chart(result["cells"], a.workdir / "evidence.png")
    sets_figure(a.workdir, result["settings"], a.workdir / "evidence-sets.png")
    (a.workdir / "evidence.md").write_text(md + "\n")
    if a.write_readme:
        write_readme(md, a.workdir / "evidence.png")
    print(md)
    print("\nBurg et al. 2023 (ResNet-50, 10% ImageNet): " + "; ".join(f"{n} {v}" for n, v in PAPER))
    print(f"\nsettings: {json.dumps(result['settings'])}")
    return 0


def run(a) -> dict:
    import diffusers.utils.logging as dlog
    import transformers

    from retrogen.evaluation import FeatureCache
    from retrogen.retrieval.embedders import create_embedder

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    data = prepare_data(a, a.workdir / "data")
    emb = create_embedder(a.embedder)
    model = get_model(a) if any(arm in GEN_ARMS for arm in a.arms) else None
    index = build_index(data, a.workdir, emb, captions=CAPTION_ARM in a.arms) if set(INDEX_ARMS) & set(a.arms) \
        else None
    cache, cells = FeatureCache(), []
    for tier in tiers(a):
        for k in tier["shots"]:
            cells += run_cell(a, tier, k, data=data, emb=emb, model=model, index=index, cache=cache)
    # images retrieved over the whole benchmark: what the one index build is amortised over
    retrieved = sum(len(list((a.workdir / "sets" / arm).glob("*/*.*" if arm in SHARED_ARMS else "*/*/*.*")))
                    for arm in INDEX_ARMS if arm in a.arms)
    build_s = index.manifest.build.get("duration_s") if index is not None else None
    settings = {key: (str(v) if isinstance(v, Path) else v) for key, v in vars(a).items()} | {
        "model": model, "corpus_size": data["corpus_size"], "test_size": data["test_size"],
        "index_build_s": build_s, "retrieved_images": retrieved,
        "index_build_seconds_per_image": build_s / retrieved if build_s and retrieved else None,
        "tiers": tiers(a)}
    return {"settings": settings, "cells": cells}


if __name__ == "__main__":
    sys.exit(main())
