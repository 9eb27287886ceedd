"""Embedders load through the same code path real models use (tiny random models saved in standard layouts)."""

import numpy as np
import pytest

from retrogen.errors import InvalidInputError, NotFoundError, UnknownComponentError
from retrogen.retrieval.embedders import create_embedder, list_embedders
from tests.conftest import colour_image

IMAGES = [colour_image((200, 30, 30)), colour_image((30, 200, 30)), colour_image((30, 30, 200), size=(64, 20))]


def check_vectors(vecs, n, dim):
    assert vecs.shape == (n, dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)


def test_open_clip_local_dir(tiny_open_clip_dir):
    e = create_embedder(f"open_clip:local-dir:{tiny_open_clip_dir}")
    assert e.supports_text and e.dim == 16
    assert e.name == f"open_clip:local-dir:{tiny_open_clip_dir.resolve()}"
    img = e.embed_images(IMAGES)
    check_vectors(img, 3, 16)
    txt = e.embed_texts(["a photo of a cat", "a photo of a dog"])
    check_vectors(txt, 2, 16)
    assert not np.allclose(txt[0], txt[1])
    # deterministic: the same weights give the same vectors through a fresh load
    again = create_embedder(f"open_clip:local-dir:{tiny_open_clip_dir}").embed_images(IMAGES)
    np.testing.assert_allclose(img, again, atol=1e-6)
    assert e.manifest_entry()["modalities"] == ["image", "text"]


def test_hf_clip_local_dir(tiny_hf_clip_dir):
    e = create_embedder(f"hf:{tiny_hf_clip_dir}")
    assert e.supports_text and e.dim == 16
    check_vectors(e.embed_images(IMAGES), 3, 16)
    check_vectors(e.embed_texts(["a cat", "a much longer description of a dog"]), 2, 16)


def test_efficientnet_torch_and_onnx_agree(onnx_cache_dir):
    t = create_embedder("efficientnet-lite0")
    o = create_embedder("efficientnet-lite0:onnx", cache_dir=onnx_cache_dir)
    assert t.name == o.name == "efficientnet-lite0"  # same vectors, so an index is queryable by either runtime
    a, b = t.embed_images(IMAGES), o.embed_images(IMAGES)
    check_vectors(a, 3, 1280)
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert list(onnx_cache_dir.glob("*.onnx")), "the ONNX export is cached"
    with pytest.raises(InvalidInputError, match="image-only"):
        t.embed_texts(["a cat"])


def test_real_efficientnet_features_separate_content():
    e = create_embedder("efficientnet-lite0")
    red1, red2, blue = e.embed_images([colour_image((220, 20, 20), noise_seed=1),
                                       colour_image((220, 20, 20), noise_seed=2),
                                       colour_image((20, 20, 220), noise_seed=3)])
    assert red1 @ red2 > red1 @ blue


@pytest.mark.parametrize("name, error, match", [
    ("nope:x", UnknownComponentError, "valid: efficientnet-lite0"),
    ("open_clip:NotAModel-99", InvalidInputError, "unknown open_clip model"),
    ("open_clip:local-dir:/does/not/exist", NotFoundError, "not an open_clip model folder"),
    ("open_clip:ViT-B-32:/does/not/exist.pt", NotFoundError, "checkpoint not found"),
    ("efficientnet-lite0:tensorrt", InvalidInputError, "runtime"),
])
def test_bad_names_give_clear_errors(name, error, match):
    with pytest.raises(error, match=match):
        create_embedder(name)


def test_hf_folder_of_the_wrong_kind(tmp_path):
    with pytest.raises(NotFoundError, match="no config.json"):
        create_embedder(f"hf:{tmp_path}")


def test_list_embedders():
    assert {"open_clip", "hf", "efficientnet-lite0"} <= set(list_embedders())


def test_the_onnx_runtime_never_loads_pytorch_weights_once_exported(onnx_cache_dir, monkeypatch):
    """Issue 12: the ONNX embedder loaded the PyTorch model and hashed its weights at every start (1.46 s)."""
    from retrogen.retrieval.embedders import efficientnet

    first = create_embedder("efficientnet-lite0:onnx", cache_dir=onnx_cache_dir)  # exports once if needed

    def refuse(*args, **kwargs):
        raise AssertionError("the ONNX runtime touched the PyTorch weights")

    monkeypatch.setattr(efficientnet, "_load_torch_model", refuse)
    monkeypatch.setattr(efficientnet, "sha256_file", refuse)
    again = create_embedder("efficientnet-lite0:onnx", cache_dir=onnx_cache_dir)
    np.testing.assert_array_equal(again.embed_images(IMAGES), first.embed_images(IMAGES))
    assert again.manifest_entry()["weights_sha256"] == first.manifest_entry()["weights_sha256"]


def test_an_index_built_with_onnx_is_read_with_onnx(tmp_path, onnx_cache_dir, monkeypatch):
    """The runtime an index was built with is the one its readers use (the library default, the service)."""
    from retrogen.index_builder.build import build_index
    from retrogen.index_builder.config import IndexBuildConfig
    from retrogen.retrieval.embedders import embedder_for_index
    from retrogen.service.core.config import IndexConfig
    from retrogen.service.domain.indexes import IndexRegistry

    monkeypatch.setenv("RETROGEN_ONNX_CACHE", str(onnx_cache_dir))
    for i, im in enumerate(IMAGES):
        im.save(tmp_path / f"{i}.png")
    m = build_index([str(tmp_path)], tmp_path / "idx", embedder=create_embedder("efficientnet-lite0:onnx"),
                    config=IndexBuildConfig(index_type="flat", num_workers=1))
    assert m.embedder["name"] == "efficientnet-lite0" and m.embedder["load_name"] == "efficientnet-lite0:onnx"
    assert embedder_for_index(m.embedder).runtime == "onnx"
    assert embedder_for_index({"name": "efficientnet-lite0"}).runtime == "torch", "older manifests: the default"
    loaded = IndexRegistry({"idx": IndexConfig(path=tmp_path / "idx")}).get("idx")
    assert loaded.embedder.load_name == "efficientnet-lite0:onnx"
