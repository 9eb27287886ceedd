"""FAISS on the GPU, checked on the CPU: which build is installed, where ``auto`` trains and searches, and the
wiring of the GPU path against a stand-in for faiss-gpu's cloner (``index_cpu_to_all_gpus`` returning a CPU
copy), so that what goes to the GPU, what the manifest and ``/v1/indexes`` say, and the results are checked.
Nothing here runs a GPU kernel: bench/gpu_check.sh does that on a GPU host."""

from __future__ import annotations

import importlib.metadata

import faiss
import numpy as np
import pytest

from retrogen.errors import InvalidInputError
from retrogen.retrieval.faiss_device import FaissInstallError, faiss_build, resolve_device
from retrogen.retrieval.index import CorpusIndex
from tests.test_index_search import clustered, make_index


@pytest.fixture
def fresh_build_check():
    faiss_build.cache_clear()
    yield
    faiss_build.cache_clear()


def test_exactly_one_faiss_build_is_accepted(monkeypatch, fresh_build_check):
    assert faiss_build().split()[0] in ("faiss-cpu", "faiss-gpu")  # setup.sh's RETROGEN_FAISS=cpu (default) | gpu
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "1.15.1" if name in ("faiss-cpu", "faiss-gpu") else real(name))
    faiss_build.cache_clear()
    with pytest.raises(FaissInstallError, match="faiss-cpu 1.15.1 and faiss-gpu 1.15.1 are installed together"):
        resolve_device("cpu")

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    faiss_build.cache_clear()
    with pytest.raises(FaissInstallError, match=r"pip install 'retrogen\[cpu\]'"):
        faiss_build()


def test_auto_is_the_gpu_only_when_faiss_sees_one(monkeypatch):
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(InvalidInputError, match="sees no GPU"):
        resolve_device("gpu")
    with pytest.raises(InvalidInputError, match="auto, cpu or gpu"):
        resolve_device("cuda")
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2, raising=False)
    assert resolve_device("auto") == "gpu" and resolve_device("gpu") == "gpu"


class FakeGpus:
    """faiss-gpu's entry points as faiss-cpu lacks them: 1 GPU; a "GPU copy" is a CPU clone, recorded."""

    def __init__(self, monkeypatch):
        self.cloned: list[str] = []
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
        monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", type("Options", (), {}), raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", self.clone, raising=False)

    def clone(self, index, options=None):
        self.cloned.append(type(faiss.downcast_index(index)).__name__)
        if options is not None:
            assert options.useFloat16LookupTables  # PQ64's tables only fit a GPU's shared memory in float16
        return faiss.clone_index(index)


@pytest.mark.parametrize("kind", ["IVF16,Flat", "ivfpq", "flat", "hnsw"])
def test_auto_trains_and_searches_on_the_gpu_where_faiss_can(tmp_path, monkeypatch, kind):
    vectors = clustered(3000, dim=32)
    cpu = make_index(tmp_path / "cpu", vectors, index_type=kind)
    assert cpu.device == "cpu" and cpu.manifest.faiss["train_device"] == "cpu"
    gpus = FakeGpus(monkeypatch)
    built = make_index(tmp_path / "gpu", vectors, index_type=kind)
    trained = kind not in ("flat", "hnsw")
    assert built.manifest.faiss["train_device"] == ("gpu" if trained else "cpu")
    assert ("IndexFlatL2" in gpus.cloned) == trained, "an IVF k-means runs on the GPU"
    assert built.manifest.build["faiss_build"] == faiss_build()

    gpus.cloned.clear()
    on_gpu = CorpusIndex.open(tmp_path / "cpu", device="auto")
    assert on_gpu.device == ("cpu" if kind == "hnsw" else "gpu"), "HNSW graphs stay on the CPU"
    if kind != "hnsw":
        assert gpus.cloned == ["IndexFlatIP" if kind == "flat" else
                               ("IndexIVFPQ" if kind == "ivfpq" else "IndexIVFFlat")]
    queries = clustered(40, dim=32, seed=7)
    for overrides in ({}, {"nprobe": 3}, {"rerank_k_factor": 4}):  # parameters reach the GPU copy unchanged
        np.testing.assert_array_equal(on_gpu.search(queries, 10, **overrides)[1],
                                      cpu.search(queries, 10, **overrides)[1])


def test_an_ondisk_index_stays_on_the_cpu(tmp_path, monkeypatch):
    """Its lists are larger than RAM by design: a GPU copy would not fit either."""
    from retrogen.index_builder.build import finish_index
    from retrogen.index_builder.config import IndexBuildConfig
    from retrogen.retrieval.index_directory import IndexDirectory
    from tests.test_index_search import write_shards

    directory = IndexDirectory(tmp_path / "idx")
    shards = write_shards(directory, clustered(1000, dim=32))
    gpus = FakeGpus(monkeypatch)
    finish_index(directory, shards, embedder_entry={"name": "vec", "dim": 32, "normalized": True}, sources=[],
                 params={}, config=IndexBuildConfig(index_type="IVF8,Flat", faiss_storage="ondisk",
                                                    num_recall_queries=50))
    assert "IndexFlatL2" in gpus.cloned  # trained on the GPU all the same
    gpus.cloned.clear()
    assert CorpusIndex.open(tmp_path / "idx", device="auto").device == "cpu" and gpus.cloned == []


def test_the_service_searches_where_each_index_is_configured_and_says_so(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import retrogen.retrieval.embedders as embedders
    from retrogen.service.core.config import IndexConfig
    from retrogen.service.domain.indexes import IndexRegistry

    make_index(tmp_path / "idx", clustered(500, dim=32), index_type="flat", name="vec")
    monkeypatch.setattr(embedders, "create_embedder",
                        lambda name, **kw: SimpleNamespace(name=name, dim=32, supports_text=False))
    FakeGpus(monkeypatch)
    registry = IndexRegistry({"auto": IndexConfig(path=tmp_path / "idx"),
                              "pinned": IndexConfig(path=tmp_path / "idx", faiss_device="cpu")})
    auto, pinned = registry.get("auto").describe(), registry.get("pinned").describe()
    assert auto["faiss_device"] == "gpu" and pinned["faiss_device"] == "cpu"
    assert auto["faiss_train_device"] == "cpu" and auto["faiss_build"] == faiss_build()  # a flat index


def test_asking_for_a_gpu_the_machine_lacks_fails_before_any_embedding(tmp_path, image_folder_for_gpu_check):
    from typer.testing import CliRunner

    from retrogen import cli

    r = CliRunner().invoke(cli.app, ["index", "build", "--source", str(image_folder_for_gpu_check), "--out",
                                     str(tmp_path / "idx"), "--embedder", "efficientnet-lite0", "--faiss-device",
                                     "gpu"])
    # the app raises; `retrogen`'s main turns it into one line and exit code 2
    assert isinstance(r.exception, InvalidInputError) and r.exception.exit_code == 2
    assert "sees no GPU" in str(r.exception) and "--faiss-device cpu" in str(r.exception)
    assert not (tmp_path / "idx" / "img_emb").exists(), "nothing embedded"


@pytest.fixture
def image_folder_for_gpu_check(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 80, 10, 10)).save(folder / f"{i}.png")
    return folder
