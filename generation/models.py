"""Base models by hub id or local directory: resolution, kind checks, and a cached weights hash."""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from retrogen.fileio import sha256_file, sha256_tree

from .errors import ModelKindError, UnknownModelError

#: model_index.json ``_class_name`` -> family. Any of these loads through the Auto pipelines.
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LFS_BLOB = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ModelRef:
    """A resolved base model: what the user named, where its files are, and which revision they are."""

    id: str  # as given: hub id or local directory
    path: Path  # local folder holding model_index.json
    revision: str | None  # hub commit sha; None for a local directory
    pipeline_class: str  # model_index.json _class_name
    family: str  # "sd" or "sdxl"


def _check_model_dir(path: Path, model: str) -> tuple[str, str]:
    index = path / "model_index.json"
    if not index.is_file():
        hint = " (it looks like a single checkpoint file's folder)" if any(path.glob("*.ckpt")) else ""
        raise ModelKindError(
            f"{model!r} is not a diffusers model directory: no model_index.json{hint}; "
            "expected a Stable Diffusion folder as save_pretrained writes it"
        )
    try:
        cls = json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError) as e:
        raise ModelKindError(f"{model!r}: unreadable model_index.json ({e})") from None
    if cls not in SUPPORTED_PIPELINES:
        raise ModelKindError(
            f"{model!r} holds a {cls}; supported: {', '.join(sorted(SUPPORTED_PIPELINES))}"
        )
    return cls, SUPPORTED_PIPELINES[cls]


def resolve_model(model: str, *, revision: str | None = None, local_files_only: bool = False) -> ModelRef:
    """A local directory, else a hub id fetched (or found) in the hub cache at ``revision``.

    Raises:
        UnknownModelError: no such directory, malformed id, or not on the hub / not cached.
        ModelKindError: the folder is not a supported diffusers Stable Diffusion model.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        cls, family = _check_model_dir(path, model)
        return ModelRef(model, path.resolve(), None, cls, family)
    if path.exists():
        raise ModelKindError(f"{model!r} is a file; give a diffusers model directory or a hub id")
    if not _HUB_ID.match(model):
        raise UnknownModelError(f"model {model!r} is neither an existing directory nor a hub id (org/name)")
    local = _download(model, revision, local_files_only)
    cls, family = _check_model_dir(local, model)
    # The hub cache lays snapshots out as .../snapshots/<commit sha>/: that sha is the resolved revision.
    return ModelRef(model, local, local.name, cls, family)


def _download(model: str, revision: str | None, local_files_only: bool) -> Path:
    """The model's snapshot folder in the hub cache, fetched when the hub may be used; one-line errors.

    Offline (``local_files_only``, or huggingface_hub's own ``HF_HUB_OFFLINE``), the cache alone is asked, so
    diffusers does not first fail to reach the hub and log about it; its warnings are held back either way,
    since the error raised here says it all in one line.
    """
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import constants

    offline = local_files_only or bool(constants.HF_HUB_OFFLINE)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return Path(DiffusionPipeline.download(model, revision=revision, local_files_only=offline))
    except Exception as e:  # hub errors come in many types (404, offline, gated, ...)
        at = f" at revision {revision!r}" if revision else ""
        if offline:
            raise UnknownModelError(
                f"model {model!r}{at} is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE "
                f"or local_files_only); download it once with network access (`hf download {model}`, or run this "
                "online), or pass a local diffusers folder as the model"
            ) from None
        raise UnknownModelError(f"model {model!r}{at} not found on the hub or in its cache ({_reason(e)}); check "
                                "the id and the network, or pass a local diffusers folder as the model") from None
    finally:
        diffusers_logging.set_verbosity(level)


def _reason(e: BaseException) -> str:
    """One short line for a hub failure: the hub's own error, else what diffusers wrapped (its root cause)."""
    cause = e.__cause__ or e.__context__
    if cause is not None and not type(e).__module__.startswith("huggingface_hub"):
        e = cause
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


_hash_lock = threading.Lock()
_file_hashes: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """A file's sha256, cached by (real path, size, mtime) for the process's lifetime.

    A hub-cache LFS blob is named by its sha256, so it is not read at all.
    """
    real = Path(os.path.realpath(path))
    if _LFS_BLOB.match(real.name) and real.parent.name == "blobs":
        return real.name
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        if key in _file_hashes:
            return _file_hashes[key]
    digest = sha256_file(real, chunk_size=1 << 22)
    with _hash_lock:
        _file_hashes[key] = digest
    return digest


def _weight_files(root: Path) -> list[str]:
    """Relative paths of the weight files under ``root``, hidden folders left out.

    Links are followed: a hub snapshot's files are links into its blob store.
    """
    return [p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.suffix in WEIGHT_SUFFIXES and p.is_file()
            and not any(s.startswith(".") for s in p.relative_to(root).parts)]


def weights_hash(path: str | os.PathLike) -> str:
    """The tree hash of the weight files under ``path`` (configs and tokenizers do not change it).

    Per-file digests come from :func:`file_sha256`, so repeated calls on the same model cost a directory walk.
    """
    return sha256_tree(path, _weight_files(Path(path)), file_digest=file_sha256)
