"""``/v1/datasets``: upload (zip/tar or JSON manifest), list, get, delete. Datasets are immutable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile

from ...crud import datasets as rows
from ...domain.datasets import delete_dataset as delete_stored
from ...domain.datasets import store_dataset
from ...domain.uploads import UploadLimits, save_upload_stream, stage_archive, stage_manifest
from ..deps import CurrentKey, DatasetId, DbDep, SettingsDep, StoreDep
from ..errors import documented
from ..schemas import MAX_OFFSET, DatasetManifest, DatasetPublic, DatasetsPublic, Name

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=DatasetPublic, summary="Upload an ImageFolder as zip or tar")
def upload_dataset(*, owner: CurrentKey, settings: SettingsDep, db: DbDep, store: StoreDep,
                   file: Annotated[UploadFile, File(description="zip or tar (.gz/.bz2/.xz) of class_name/image files")],
                   name: Annotated[Name, Form()] = "dataset") -> DatasetPublic:
    tmp = Path(settings.data_dir) / "tmp"
    saved = save_upload_stream(iter(lambda: file.file.read(1 << 20), b""), tmp, settings.max_upload_bytes)
    try:
        staged = stage_archive(saved, UploadLimits.from_settings(settings), tmp)
    finally:
        saved.unlink(missing_ok=True)
    return DatasetPublic.of(store_dataset(db, store, owner=owner, name=name, staged=staged))


@router.post("/manifest", status_code=201, response_model=DatasetPublic,
             summary="Upload a JSON manifest: labels + base64 images or server-side paths", responses=documented(403))
def upload_manifest(body: DatasetManifest, owner: CurrentKey, settings: SettingsDep, db: DbDep,
                    store: StoreDep) -> DatasetPublic:
    staged = stage_manifest([im.model_dump() for im in body.images], UploadLimits.from_settings(settings),
                            Path(settings.data_dir) / "tmp", settings.server_root)
    return DatasetPublic.of(store_dataset(db, store, owner=owner, name=body.name, staged=staged))


@router.get("", response_model=DatasetsPublic, summary="Your datasets, newest first")
def list_datasets(owner: CurrentKey, db: DbDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                  offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> DatasetsPublic:
    found, count = rows.list_datasets(db, owner, limit=limit, offset=offset)
    return DatasetsPublic(data=[DatasetPublic.of(d) for d in found], count=count)


@router.get("/{dataset_id}", response_model=DatasetPublic, summary="One dataset: classes and counts",
            responses=documented(404))
def get_dataset(dataset_id: DatasetId, owner: CurrentKey, db: DbDep) -> DatasetPublic:
    return DatasetPublic.of(rows.get_dataset(db, owner, dataset_id))


@router.delete("/{dataset_id}", status_code=204, summary="Delete a dataset (refused while jobs use it)",
               responses=documented(404, 409))
def delete_dataset(dataset_id: DatasetId, owner: CurrentKey, db: DbDep, store: StoreDep) -> Response:
    delete_stored(db, store, owner, dataset_id)
    return Response(status_code=204)
