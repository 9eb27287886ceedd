"""Which FAISS build this environment has, and whether an index trains and searches on the GPU.

faiss-cpu and faiss-gpu install the same ``faiss`` module, so one overwrites the other's files: retrogen takes
FAISS from exactly one of its extras (``retrogen[cpu]`` or ``retrogen[gpu]``) and refuses an environment that
has two. The GPU build (faiss-gpu 1.15.1: CUDA 12, SASS for sm_70-sm_90 and sm_90 PTX, so Hopper runs it
natively) brings its CUDA 12 runtime as ``nvidia-*-cu12`` wheels, which install beside torch's CUDA 13 ones
(other folders, other sonames). faiss-gpu-cuvs 1.15.1 needs CUDA 13.2 libraries, which torch 2.14.1's pin of
CUDA 13.0 excludes.

Device ``auto`` is the GPU when the FAISS build sees one, else the CPU. On the GPU: an IVF index's k-means runs
there (the costly part of training), and flat / IVF indexes are searched there; HNSW graphs stay on the CPU.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from typing import Any, Literal

from retrogen.errors import InvalidInputError

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "gpu"]
DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cuvs")


class FaissInstallError(InvalidInputError):
    """The environment has no FAISS build, or more than one (their files overwrite each other)."""


@functools.cache
def faiss_build() -> str:
    """The installed FAISS distribution (one of ``DISTRIBUTIONS``); raises when there are none or several."""
    found = []
    for name in DISTRIBUTIONS:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    if len(found) > 1:
        raise FaissInstallError(f"{' and '.join(found)} are installed together; they install the same 'faiss' "
                                "module over each other: pip uninstall all of them, then install retrogen[cpu] "
                                "or retrogen[gpu]")
    if not found:
        raise FaissInstallError("FAISS is not installed: pip install 'retrogen[cpu]' (or 'retrogen[gpu]' on a "
                                "CUDA host)")
    return found[0]


def gpu_count() -> int:
    """GPUs the installed FAISS build can use (0 for faiss-cpu)."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def resolve_device(requested: str = "auto") -> str:
    """``cpu`` or ``gpu`` for a requested ``auto`` | ``cpu`` | ``gpu``; asking for the GPU without one is an
    error (a silent CPU run would be hours slower than asked for)."""
    if requested not in ("auto", "cpu", "gpu"):
        raise InvalidInputError(f"faiss device must be auto, cpu or gpu, got {requested!r}")
    faiss_build()  # one FAISS build, or a clear error before the first faiss call
    if requested == "cpu":
        return "cpu"
    gpus = gpu_count()
    if requested == "gpu" and gpus == 0:
        raise InvalidInputError(f"faiss device 'gpu' asked for, but {faiss_build()} sees no GPU; install "
                                "retrogen[gpu] on a CUDA host, or use --faiss-device cpu")
    return "gpu" if gpus else "cpu"


def train(index: Any, vectors: Any, device: str) -> None:
    """``index.train(vectors)``; on the GPU an IVF index's coarse k-means runs there (its quantizer's
    assignment step is what training spends its time on), the rest as on the CPU."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index) if device == "gpu" else None
    if ivf is not None:
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    index.train(vectors)
    if ivf is not None:
        ivf.clustering_index = None  # the GPU copy is not part of the index (and would not serialise)


def for_search(index: Any, device: str) -> tuple[Any, str]:
    """(the index to search, where it runs): on ``gpu``, a GPU copy of a flat or IVF index (float16 lookup tables
    for PQ, which wide codes need in shared memory); an ``IndexRefine`` keeps its float16 store on the CPU and
    re-ranks the GPU's candidates from it. Anything else (HNSW, an on-disk IVF index), or device ``cpu``:
    ``index`` as it is."""
    import faiss

    if device != "gpu":
        return index, "cpu"
    if isinstance(index, faiss.IndexRefine):
        base, where = for_search(faiss.downcast_index(index.base_index), device)
        if where != "gpu":
            return index, "cpu"
        refined = faiss.IndexRefine(base, index.refine_index)
        refined.k_factor = index.k_factor
        refined.referenced_objects = [base, index]  # faiss holds raw pointers to both
        return refined, "gpu"
    from .index_directory import ondisk_lists

    inner = faiss.downcast_index(index)
    if not (isinstance(inner, faiss.IndexFlat) or faiss.try_extract_index_ivf(inner) is not None):
        return index, "cpu"
    if ondisk_lists(inner) is not None:  # lists larger than RAM by design: a GPU copy would not fit either
        return index, "cpu"
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16LookupTables = True
    log.info("searching %s on %d GPU(s)", type(inner).__name__, gpu_count())
    return faiss.index_cpu_to_all_gpus(inner, options), "gpu"
