"""Label purity of retrieved sets under each selection policy, on the evidence benchmark's data.

    .venv/bin/python bench/evidence.py ...            # first: prepares the corpus index and the draws
    .venv/bin/python bench/selection_purity.py        # then: minutes on 2 cores

The corpus captions ("a photo of a {class}") carry the label retrieval never sees, so purity is the share of
retrieved images whose caption names their class. Every policy runs on the same draws of k shots per class
(N = 20); diffs are paired per draw, with a t-interval over draws. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

POLICIES = {"knn": {}, "diverse (pool 2N)": {"selection": "diverse"},
            "diverse (pool 200)": {"selection": "diverse", "diversity_pool": 200}}


def main(argv: list[str] | None = None) -> int:
    from scipy import stats

    from retrogen.retrieval import RetrievalConfig, augment_by_retrieval
    from retrogen.retrieval.embedders import create_embedder
    from retrogen.retrieval.index import CorpusIndex

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path(".retrogen/evidence"))
    p.add_argument("--shots", default="1,3,5")
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--per-class", type=int, default=20)
    a = p.parse_args(argv)
    corpus = CorpusIndex.open(a.workdir / "index")
    emb = create_embedder("efficientnet-lite0:onnx")
    print("| k | policy | purity | − knn [95% CI] | selection ms/class | search ms/class |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for k in (int(x) for x in a.shots.split(",")):
            got: dict[str, list[dict]] = {name: [] for name in POLICIES}
            for d in range(a.draws):
                shots = a.workdir / "data" / "draws" / f"k{k}" / f"d{d}" / "shots"
                for name, kw in POLICIES.items():
                    r = augment_by_retrieval(shots, Path(tmp, "out"), corpus=corpus, per_class=a.per_class,
                                             config=RetrievalConfig(**kw), embedder=emb, overwrite=True)
                    purity = np.mean([rec["label"].replace("_", " ") in (rec["caption"] or "") for rec in r.records])
                    classes = len(r.summary["per_class"])
                    got[name].append({"purity": purity, "sel": r.summary["timings"]["selection_s"] / classes,
                                      "search": r.summary["timings"]["search_s"] / classes})
            base = np.array([x["purity"] for x in got["knn"]])
            for name, rows in got.items():
                pur = np.array([x["purity"] for x in rows])
                diff = pur - base
                half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
                mid = diff.mean()
                ci = "–" if name == "knn" else f"{mid:+.3f} [{mid - half:+.3f}, {mid + half:+.3f}]"
                print(f"| {k} | {name} | {pur.mean():.3f} | {ci} | {1e3 * np.median([x['sel'] for x in rows]):.1f} "
                      f"| {1e3 * np.median([x['search'] for x in rows]):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
