"""A typed Python client for the retrogen HTTP API (httpx). It imports no server code, and torch only
when :meth:`RetrogenClient.as_torch_dataset` is called.

    from retrogen.client import RetrogenClient
    with RetrogenClient("http://127.0.0.1:8000") as rc:
        ds = rc.upload_folder("my_dataset/")
        job = rc.wait(rc.submit(ds["id"], "retrieval", per_class=50, params={"mode": "image"})["id"])
        rc.download(job["id"], "augmented/")            # ImageFolder + provenance.jsonl + summary.json
        train_set = rc.as_torch_dataset("augmented/")   # torch.utils.data.Dataset of (image, class index)
"""

from __future__ import annotations

import os
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

from .errors import InvalidInputError, NotFoundError, RetrogenError
from .imageio import decode_image, is_image_path
from .outputs import OutputFolder

TERMINAL = ("succeeded", "failed", "cancelled")


class RetrogenAPIError(RetrogenError):
    """The server answered with an error; ``status`` is the HTTP status, the message is the server's detail."""

    def __init__(self, status: int, detail: str):
        self.status, self.detail = status, detail
        self.http_status = status
        super().__init__(f"HTTP {status}: {detail}")


class JobFailedError(RetrogenError):
    """``wait`` saw the job end failed or cancelled."""


class RetrogenClient:
    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s,
                                 transport=transport)

    def __enter__(self) -> RetrogenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except Exception:
                detail = r.text[:500]
            raise RetrogenAPIError(r.status_code, str(detail))
        return r

    # -- datasets ---------------------------------------------------------------------------------------------
    def upload_folder(self, folder: str | os.PathLike, *, name: str | None = None) -> dict[str, Any]:
        """Zip ``folder`` (``class_name/image`` files) and upload it; returns the dataset."""
        folder = Path(folder)
        if not folder.is_dir():
            raise NotFoundError(f"no folder {folder}")
        with tempfile.TemporaryFile() as tmp:
            n = 0
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
                for cls in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
                    for f in sorted(cls.iterdir()):
                        if f.is_file() and not f.name.startswith(".") and is_image_path(f.name):
                            zf.write(f, f"{cls.name}/{f.name}")
                            n += 1
            if not n:
                raise InvalidInputError(f"{folder} holds no class_name/image files")
            tmp.seek(0)
            r = self.http.post("/v1/datasets", files={"file": ("dataset.zip", tmp, "application/zip")},
                               data={"name": name or folder.name})
        return self._check(r).json()

    def datasets(self) -> list[dict[str, Any]]:
        return self._check(self.http.get("/v1/datasets")).json()["data"]

    def delete_dataset(self, dataset_id: str) -> None:
        self._check(self.http.delete(f"/v1/datasets/{dataset_id}"))

    # -- jobs -------------------------------------------------------------------------------------------------
    def submit(self, dataset_id: str | None, method: str, *, per_class: int, index_name: str | None = None,
               model_name: str | None = None, params: dict[str, Any] | None = None,
               classes: list[str] | None = None, holdout: str | None = None) -> dict[str, Any]:
        """Queue a job; ``index_name`` / ``model_name`` are the server's configured names (default: its first).

        A retrieval job may give ``classes`` (names, no images) with ``dataset_id=None``, and a ``holdout``
        dataset id whose images nothing returned may near-duplicate."""
        body = {"dataset": dataset_id, "method": method, "per_class": per_class, "index": index_name,
                "model": model_name, "params": params or {}}
        body |= {k: v for k, v in (("classes", classes), ("holdout", holdout)) if v is not None}
        return self._check(self.http.post("/v1/jobs", json=body)).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/jobs/{job_id}")).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.post(f"/v1/jobs/{job_id}/cancel")).json()

    def wait(self, job_id: str, *, timeout_s: float | None = None, poll_s: float = 0.5,
             progress: bool = True) -> dict[str, Any]:
        """Poll until the job ends; a tqdm bar shows done/total of the current stage. Raises JobFailedError."""
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=0, desc=job_id, unit="img", leave=False)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                job = self.job(job_id)
                p = job.get("progress") or {}
                if bar is not None:
                    bar.total = p.get("total") or 0
                    bar.n = p.get("done") or 0
                    bar.set_postfix_str(f"{job['state']} {p.get('stage') or ''}".strip())
                    bar.refresh()
                if job["state"] in TERMINAL:
                    if job["state"] != "succeeded":
                        raise JobFailedError(f"job {job_id} {job['state']}: {job.get('error') or ''}".strip())
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {job['state']} after {timeout_s}s")
                time.sleep(poll_s)
        finally:
            if bar is not None:
                bar.close()

    def results(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/jobs/{job_id}/results")).json()

    def download(self, job_id: str, dest: str | os.PathLike) -> Path:
        """Stream the ImageFolder export into ``dest`` (created; must be empty or absent)."""
        dest = Path(dest)
        if dest.exists() and any(dest.iterdir()):
            raise InvalidInputError(f"{dest} is not empty")
        dest.mkdir(parents=True, exist_ok=True)
        with self.http.stream("GET", f"/v1/jobs/{job_id}/export", params={"format": "imagefolder"}) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            with tempfile.TemporaryFile() as tmp:
                for chunk in r.iter_bytes():
                    tmp.write(chunk)
                tmp.seek(0)
                with tarfile.open(fileobj=tmp, mode="r:") as tar:
                    for m in tar.getmembers():
                        parts = PurePosixPath(m.name).parts
                        if not m.isfile() or m.name.startswith("/") or ".." in parts:
                            raise InvalidInputError(f"refusing archive member {m.name!r}")
                        target = dest.joinpath(*parts)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(tar.extractfile(m).read())
        return dest

    @staticmethod
    def as_torch_dataset(folder: str | os.PathLike, transform=None, *, classes: list[str] | None = None):
        """A ``torch.utils.data.Dataset`` of ``(image, class index)`` over a downloaded result.

        Class indices follow the dataset's class list, not the labels that happen to be in the result: a
        class that got no image (a high ``min_similarity``, say) keeps its index, so indices match the
        original dataset's (``torchvision.datasets.ImageFolder`` order: sorted) and a model trained on both.
        The list is ``classes`` when given (its order is the indices), else every class requested, from the
        result's ``summary.json``. Images are RGB PIL images unless ``transform`` maps them; ``.classes``,
        ``.class_to_idx`` and ``.provenance`` (one record per item, same order) come with it.

        Raises:
            NotFoundError: not a downloaded result (no provenance.jsonl), or no summary and no ``classes``.
            InvalidInputError: a record's label is not in the class list.
        """
        return _ImageFolderDataset(Path(folder), transform, classes)


def _class_list(result: OutputFolder, classes: list[str] | None) -> list[str]:
    """The explicit list, else every class the job was asked for (summary.json ``per_class``), sorted."""
    if classes is not None:
        if len(set(classes)) != len(classes) or not all(isinstance(c, str) for c in classes):
            raise InvalidInputError("classes must be distinct class names")
        return list(classes)
    try:
        per_class = result.summary().get("per_class")
    except FileNotFoundError:
        raise NotFoundError(f"{result.path} has no summary.json to read the class list from; pass classes=[...] "
                            "(the dataset's class names, in index order)") from None
    if not isinstance(per_class, dict) or not per_class:
        raise InvalidInputError(f"{result.path}/summary.json lists no classes (per_class); pass classes=[...]")
    return sorted(per_class)


def _ImageFolderDataset(folder: Path, transform, classes: list[str] | None):  # noqa: N802 - a factory: torch on use
    from torch.utils.data import Dataset

    result = OutputFolder(folder)

    class ResultDataset(Dataset):
        def __init__(self) -> None:
            if not result.has_provenance:
                raise NotFoundError(f"{folder} has no provenance.jsonl (not a downloaded retrogen result)")
            self.provenance = result.records()
            self.classes = _class_list(result, classes)
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
            unknown = sorted({r["label"] for r in self.provenance} - set(self.class_to_idx))
            if unknown:
                raise InvalidInputError(f"{folder} has images labelled {unknown[:5]}, not in the class list "
                                        f"{self.classes}")

        def __len__(self) -> int:
            return len(self.provenance)

        def __getitem__(self, i: int):
            rec = self.provenance[i]
            image = decode_image(result.file(rec).read_bytes())
            return (transform(image) if transform else image), self.class_to_idx[rec["label"]]

    return ResultDataset()


__all__ = ["RetrogenClient", "RetrogenAPIError", "JobFailedError"]
