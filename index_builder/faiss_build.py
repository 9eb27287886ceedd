"""Choose, train and fill the FAISS index, and measure its recall against exact search.

``--index-type auto`` picks by corpus size and memory budget, checked before any work (as autofaiss does):
exact ``Flat`` inner product up to ``FLAT_MAX`` vectors; ``HNSW32,Flat`` up to ``HNSW_MAX`` when it fits;
otherwise IVF-PQ. PQ factories always carry the ``np`` suffix: a plain ``PQ64`` triggers polysemous
training (measured here: 100 s vs 2.9 s on 20k vectors). PQ alone is coarse (recall@10 ~0.25 on clustered
1M x 512 data), so an IVF-PQ index is a faiss ``IndexRefine``: the PQ search proposes ``k * rerank_k_factor``
candidates and faiss re-scores them from a float16 copy of the vectors held in the index (``Refine(SQfp16)``,
2 bytes x dim per vector; ``SQ8`` at 1 byte when the budget is tighter). faiss's own refine runs in C++ per
query; the older re-rank in numpy over the memory-mapped shards cost 5x the PQ search itself at 100k.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from retrogen.progress import ProgressEvent, ProgressFn, emit
from retrogen.retrieval.faiss_device import faiss_build, resolve_device, train
from retrogen.retrieval.index import searching_index

from .config import parse_memory
from .errors import IndexBuildError, MemoryBudgetError

log = logging.getLogger(__name__)

FLAT_MAX = 100_000
HNSW_MAX = 2_000_000
HNSW_M = 32
HNSW_EF_SEARCH = 64
EF_CONSTRUCTION = 128  # HNSW graph build depth to start from (faiss's own default, 40, caps recall near 0.92)
EF_CONSTRUCTION_MAX = 512  # an HNSW graph that misses the target recall is rebuilt deeper up to this
IVFPQ_RERANK = 10
ID_MAP_BYTES = 8  # per vector: tuned indexes are IndexIDMap (see build_faiss)
REFINES = (("SQfp16", 2), ("SQ8", 1), (None, 0))  # IVF-PQ's re-rank store, bytes per dimension; best first
KINDS = ("auto", "flat", "hnsw", "ivfpq")


@dataclass(frozen=True)
class IndexPlan:
    factory: str
    kind: str  # flat | hnsw | ivfpq | custom
    search_defaults: dict = field(default_factory=dict)
    rerank_k_factor: int = 1
    memory_bytes: int | None = None  # estimated RAM of the FAISS index (None: unknown, custom factory)
    train_size: int = 0  # vectors sampled to train it (0: no training)

    def manifest_entry(self) -> dict:
        d = asdict(self)
        d.pop("train_size")
        return d


def _fmt(nbytes: int) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if nbytes < 1024 or unit == "T":
            return f"{nbytes:.1f}{unit}" if unit != "B" else f"{nbytes}B"
        nbytes /= 1024
    return str(nbytes)


def _flat(count: int, dim: int) -> IndexPlan:
    return IndexPlan("Flat", "flat", {}, 1, count * dim * 4, 0)


def _hnsw(count: int, dim: int) -> IndexPlan:
    # vectors + ~2*M neighbour ids per node on level 0 (int32) + upper levels (~1/M of nodes) + the id map
    mem = int(count * (dim * 4 + HNSW_M * 2 * 4 * 1.1 + ID_MAP_BYTES))
    return IndexPlan(f"HNSW{HNSW_M},Flat", "hnsw", {"efSearch": HNSW_EF_SEARCH}, 1, mem, 0)


def _ivfpq(count: int, dim: int, budget: int | None) -> IndexPlan:
    if count < 64:
        raise IndexBuildError(f"ivfpq needs at least 64 vectors to train, the corpus has {count}; use --index-type flat")
    nbits = 8 if count >= 256 * 39 else 4
    nlist = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(count)))))
    nlist = max(1, min(nlist, count // 39))
    train = min(count, max(nlist * 39, 2 ** nbits * 39, 10_000), 200_000)
    candidates = [m for m in (64, 48, 32, 16, 8, 4, 2, 1) if dim % m == 0 and m <= dim]
    for refine, width in REFINES:  # the most accurate re-rank store that fits, then the largest PQ code
        for m in candidates:
            code = math.ceil(m * nbits / 8)
            mem = count * (code + 8 + width * dim + ID_MAP_BYTES) + nlist * dim * 4 + m * 2 ** nbits * (dim // m) * 4
            if budget is None or mem <= budget:
                suffix = "np" if nbits == 8 else f"x{nbits}np"
                nprobe = min(nlist, max(4, nlist // 16))
                factory = f"IVF{nlist},PQ{m}{suffix}" + (f",Refine({refine})" if refine else "")
                return IndexPlan(factory, "ivfpq", {"nprobe": nprobe}, IVFPQ_RERANK, mem, train)
    smallest = count * (9 + ID_MAP_BYTES) + nlist * dim * 4
    raise MemoryBudgetError(f"no IVF-PQ index of {count} vectors (dim {dim}) fits the memory budget "
                            f"{_fmt(budget)}; the smallest needs about {_fmt(smallest)}")


def plan_index(count: int, dim: int, *, index_type: str = "auto",
               memory_budget: str | int | None = None) -> IndexPlan:
    """Choose the index for ``count`` vectors of ``dim`` within ``memory_budget`` (bytes or ``"4G"``).

    Raises:
        MemoryBudgetError: the requested (or every automatic) choice exceeds the budget.
        IndexBuildError: an unknown kind or an invalid FAISS factory string.
    """
    budget = parse_memory(memory_budget)
    if count < 1:
        raise IndexBuildError("the corpus has no vectors to index")
    kind = (index_type or "auto").strip()
    if kind == "auto":
        for make, limit in ((_flat, FLAT_MAX), (_hnsw, HNSW_MAX)):
            plan = make(count, dim)
            if count <= limit and (budget is None or plan.memory_bytes <= budget):
                return plan
        return _ivfpq(count, dim, budget)
    if kind in ("flat", "hnsw"):
        plan = (_flat if kind == "flat" else _hnsw)(count, dim)
        if budget is not None and plan.memory_bytes > budget:
            raise MemoryBudgetError(f"a {kind} index of {count} vectors (dim {dim}) needs about "
                                    f"{_fmt(plan.memory_bytes)}, over the budget {_fmt(budget)}; use --index-type "
                                    "ivfpq or auto, or raise --memory-budget")
        return plan
    if kind == "ivfpq":
        return _ivfpq(count, dim, budget)
    return _custom(kind, count, dim, budget)


def _custom(factory: str, count: int, dim: int, budget: int | None) -> IndexPlan:
    import faiss

    if re.search(r"PQ\d+(x\d+)?(,|$)", factory):
        log.warning("factory %r: PQ without the 'np' suffix trains polysemous codes (slow); consider PQ..np", factory)
    try:
        probe = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise IndexBuildError(f"--index-type {factory!r} is neither {'|'.join(KINDS)} nor a valid FAISS factory string "
                              f"(e.g. 'IVF256,PQ32np' or 'HNSW32,Flat'): {str(e).splitlines()[-1][:160]}") from None
    defaults: dict = {}
    inner = probe.index if isinstance(probe, faiss.IndexPreTransform) else probe
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        defaults["nprobe"] = min(ivf.nlist, max(4, ivf.nlist // 16))
    elif isinstance(faiss.downcast_index(inner), faiss.IndexHNSW):
        defaults["efSearch"] = HNSW_EF_SEARCH
    lossy = re.search(r"(PQ|SQ|LSH|RQ|LSQ)", factory.upper()) is not None
    train = min(count, max(10_000, 39 * (ivf.nlist if ivf is not None else 256)), 200_000) \
        if not probe.is_trained else 0
    if budget is not None:
        log.warning("memory budget is not checked for custom factory %r", factory)
    return IndexPlan(factory, "custom", defaults, IVFPQ_RERANK if lossy else 1, None, train)


def sample_ids(count: int, size: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """``size`` sorted row ids drawn without replacement, avoiding ``exclude`` when enough rows remain."""
    rng = np.random.default_rng(seed)
    pool = np.arange(count)
    if exclude is not None and count - len(exclude) >= size:
        pool = np.setdiff1d(pool, exclude, assume_unique=True)
    return np.sort(rng.choice(pool, size=min(size, len(pool)), replace=False))


def record_train_device(manifest, config, *, trains: bool) -> str:
    """Where the index trains (``config.faiss_device`` resolved: the GPU when faiss-gpu sees one), written into
    the manifest beside the FAISS build that ran it; an untrained kind (flat, HNSW) says ``cpu``."""
    device = resolve_device(config.faiss_device) if trains else "cpu"
    manifest.faiss["train_device"] = device
    manifest.build["faiss_build"] = faiss_build()
    return device


def build_faiss(plan: IndexPlan, dim: int, count: int, chunks: Callable[[], Iterable[np.ndarray]], *,
                train_vectors: np.ndarray | None = None, progress: ProgressFn | None = None,
                ef_construction: int | None = None, held_out: np.ndarray | None = None, device: str = "cpu"):
    """Create the index from ``plan``, train it on ``train_vectors`` if needed (an IVF k-means on the GPU when
    ``device`` is ``gpu``, see ``retrieval.faiss_device.train``), add all ``chunks`` in row order.

    ``ef_construction``: the HNSW graph's build depth, for indexes with an HNSW graph (faiss's default is 40).
    ``held_out``: sorted row ids left out for now (the recall probe's queries, see ``RecallProbe``); the index
    is then an ``IndexIDMap`` (8 bytes per vector) so that rows keep their ids whatever order they go in, and
    ``add_held_out`` adds them once the probe is done.
    """
    import faiss

    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    hnsw = _hnsw_of(index)
    if hnsw is not None and ef_construction is not None:
        hnsw.hnsw.efConstruction = int(ef_construction)
    if not index.is_trained:
        if train_vectors is None or len(train_vectors) == 0:
            raise IndexBuildError(f"index {plan.factory!r} needs training vectors")
        emit(progress, ProgressEvent("faiss_train", 0, 1, message=plan.factory))
        train(index, np.ascontiguousarray(train_vectors, dtype=np.float32), device)
        emit(progress, ProgressEvent("faiss_train", 1, 1, message=plan.factory))
    if held_out is not None:
        index = faiss.IndexIDMap(index)  # owns the inner index from here (faiss's Python wrapper keeps it alive)
    added = 0
    for chunk in chunks():
        if held_out is None:
            index.add(chunk)
        else:
            ids = np.arange(added, added + len(chunk), dtype=np.int64)
            keep = ~np.isin(ids, held_out, assume_unique=True)
            index.add_with_ids(np.ascontiguousarray(chunk[keep]), ids[keep])
        added += len(chunk)
        emit(progress, ProgressEvent("faiss_add", added, count, message=plan.factory))
    expected = count - (0 if held_out is None else len(held_out))
    if index.ntotal != expected:
        raise IndexBuildError(f"added {index.ntotal} vectors to the index, expected {expected}")
    return index


def add_held_out(index, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Add the rows ``build_faiss`` held out, under their own ids."""
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))


def has_hnsw(index) -> bool:
    return _hnsw_of(index) is not None


def _hnsw_of(index):
    """The ``IndexHNSW`` inside ``index`` (itself, or under an id map / pre-transform), or None."""
    import faiss

    inner = searching_index(index)
    inner = inner.index if isinstance(inner, faiss.IndexPreTransform) else inner
    inner = faiss.downcast_index(inner)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


@dataclass
class RecallProbe:
    """Stored vectors held out of the index (and of training) as queries, with their exact top-k among the
    indexed rows.

    Queries must not be in the index: a stored vector finds itself and, in an HNSW graph, its own links, which
    are its neighbours. Measured on 1M x 512 clustered data, HNSW at efSearch 32 scored 0.955 with indexed rows
    as queries and 0.905 with fresh ones, so the build holds these rows out until tuning is done.
    """

    qids: np.ndarray
    queries: np.ndarray
    truth: list[list[int]]
    k: int
    seed: int

    @classmethod
    def make(cls, qids: np.ndarray, queries: np.ndarray, chunks: Callable[[], Iterable[np.ndarray]], *,
             k: int = 10, seed: int = 0) -> RecallProbe:
        """Exact top-``k`` by inner product of ``queries`` (the rows ``qids``) over every row of ``chunks``
        but ``qids``."""
        import faiss

        heap, start = faiss.ResultHeap(len(qids), k, keep_max=True), 0
        for chunk in chunks():
            ids = np.arange(start, start + len(chunk), dtype=np.int64)
            keep = ~np.isin(ids, qids, assume_unique=True)
            start += len(chunk)
            if keep.any():
                scores, pos = faiss.knn(queries, np.ascontiguousarray(chunk[keep]), min(k, int(keep.sum())),
                                        metric=faiss.METRIC_INNER_PRODUCT)
                heap.add_result(scores, ids[keep][pos])
        heap.finalize()
        truth = [[int(i) for i in row if i >= 0] for row in heap.I]
        return cls(np.asarray(qids), np.asarray(queries, np.float32), truth, k, seed)

    def recall(self, corpus, **overrides) -> tuple[float, float]:
        """(recall@k of ``corpus.search`` with these per-call overrides, milliseconds per query in a batch)."""
        t0 = time.perf_counter()
        _, approx = corpus.search(self.queries, self.k, **overrides)
        ms = 1000 * (time.perf_counter() - t0) / max(1, len(self.qids))
        hits = [len(set(a_row) & set(t)) / len(t) for a_row, t in zip(approx.tolist(), self.truth, strict=True) if t]
        return (float(np.mean(hits)) if hits else 1.0), ms

    def entry(self, recall: float) -> dict:
        return {"recall_at_10" if self.k == 10 else f"recall_at_{self.k}": round(recall, 4),
                "num_queries": len(self.qids), "seed": self.seed,
                "method": "stored vectors held out of the index and of training as queries (added after tuning); "
                          "exact inner-product ground truth over the indexed rows; search with the chosen "
                          "defaults, re-rank included"}


EF_SEARCH_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
RERANK_GRID = (1, 2, 5, 10, 20, 50, 100)


def operating_points(corpus, *, rerank: int | None) -> list[list[dict]]:
    """Search settings to try, as ladders of rising cost (each ladder stops at its first point that reaches the
    target): efSearch for HNSW; nprobe (powers of 2 up to nlist) for each re-rank depth for IVF."""
    import faiss

    index = corpus.faiss_index
    inner = index.index if isinstance(index, faiss.IndexPreTransform) else index
    ivf = faiss.try_extract_index_ivf(inner)
    lossy = corpus.rerank_k_factor > 1 or corpus.manifest.faiss.get("kind") == "ivfpq"
    depths = (rerank,) if rerank is not None else (RERANK_GRID if lossy else (1,))
    if ivf is not None:
        probes = [2 ** i for i in range(int(math.log2(max(1, ivf.nlist))) + 1)]
        return [[{"nprobe": p, "rerank_k_factor": d} for p in probes] for d in depths]
    if _hnsw_of(index) is not None:
        return [[{"ef_search": e, "rerank_k_factor": d} for e in EF_SEARCH_GRID] for d in depths]
    return [[{"rerank_k_factor": d}] for d in depths]


def tune_search(corpus, probe: RecallProbe, *, target: float, rerank: int | None = None) -> dict:
    """The cheapest measured operating point whose recall@k reaches ``target`` (else the most accurate one).

    Returns the manifest's ``recall`` entry: the chosen point, whether it met the target, and every point tried
    (recall and batched ms/query), so the numbers a reader sees are the ones measured.
    """
    tried = []
    for ladder in operating_points(corpus, rerank=rerank):
        for point in ladder:
            recall, ms = probe.recall(corpus, **point)
            tried.append({**point, "recall": round(recall, 4), "ms_per_query": round(ms, 4)})
            if recall >= target:
                break
    met = [t for t in tried if t["recall"] >= target]
    best = min(met, key=lambda t: (t["ms_per_query"], -t["recall"])) if met else max(tried, key=lambda t: t["recall"])
    if not met:
        log.warning("no operating point reached recall %.3f; using the most accurate (%.3f)", target, best["recall"])
    point = {key: best[key] for key in ("nprobe", "ef_search", "rerank_k_factor") if key in best}
    return probe.entry(best["recall"]) | {"target": target, "met": bool(met), "operating_point": point,
                                          "tried": tried}
