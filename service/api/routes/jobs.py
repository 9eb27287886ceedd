"""``/v1/jobs``: submit augmentation jobs, follow them, cancel them, and fetch their results."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Response
from fastapi.responses import StreamingResponse

from retrogen.errors import InvalidInputError, NotFoundError
from retrogen.fileio import media_type

from ...core.config import Settings
from ...core.errors import ConflictError
from ...core.tables import Job
from ...crud import datasets as dataset_rows
from ...crud import jobs as crud
from ...domain import export
from ...domain.indexes import IndexRegistry
from ...domain.runners import MethodSpec, SubmitCheck
from ..deps import (
    CurrentKey,
    DbDep,
    IndexRegistryDep,
    JobDep,
    JobDepKeyInUrl,
    MethodsDep,
    SettingsDep,
    StoreDep,
)
from ..errors import documented
from ..schemas import MAX_OFFSET, JobCreate, JobEventPublic, JobPublic, JobsPublic, ResultsPublic

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _configured(kind: str, given: str | None, configured: dict[str, object]) -> str:
    """The configured name a job uses: the one given, or the first configured; 404 naming the valid ones."""
    if not configured:
        setting = "RETROGEN_INDEXES" if kind == "index" else "RETROGEN_MODELS"
        raise NotFoundError(f"no {'index' if kind == 'index' else 'generation model'} is configured on this server "
                            f"(set {setting})")
    name = given or next(iter(configured))
    if name not in configured:
        raise NotFoundError(f"unknown {kind} {name!r}; configured: {', '.join(configured)}")
    return name


def _check_job(body: JobCreate, spec: MethodSpec, settings: Settings,
               registry: IndexRegistry) -> tuple[str | None, str | None]:
    """(index name, model name) of a request, after the checks that need no worker: the params themselves,
    then what the configured index / model can do with them (manifest facts; nothing is loaded)."""
    if body.per_class > settings.max_per_class:
        raise InvalidInputError(f"per_class={body.per_class} exceeds this server's maximum of {settings.max_per_class}")
    index_name = _configured("index", body.index, settings.indexes) if spec.needs_index else None
    model_name = _configured("model", body.model, settings.models) if spec.needs_model else None
    if spec.validate is not None:
        spec.validate(body.params)
    if spec.check is not None:
        spec.check(SubmitCheck(params=body.params, index_name=index_name, model_name=model_name, settings=settings,
                               index_registry=registry))
    return index_name, model_name


def _with_request_params(body: JobCreate, spec: MethodSpec, db, owner: str) -> dict:
    """``params`` plus the request's ``classes`` and ``holdout`` (a retrieval job's; stored with its params, so
    the worker and every listing see them). Params may not set them themselves: a holdout names a stored tree."""
    params = dict(body.params)
    reserved = sorted(set(params) & {"classes", "holdout"})
    if reserved:
        raise InvalidInputError(f"params {reserved} are set by the request's top-level fields, not in params")
    if (body.classes or body.holdout) and spec.kind != "retrieval":
        raise InvalidInputError(f"method {spec.name!r} needs a dataset; 'classes' and 'holdout' are for retrieval")
    if body.classes:
        from retrogen.retrieval.modes import check_class_names

        params["classes"] = check_class_names(body.classes)
    if body.holdout:
        held = dataset_rows.get_dataset(db, owner, body.holdout)
        params["holdout"] = {"dataset": held.id, "key": held.content_key}
    return params


@router.post("", status_code=202, response_model=JobPublic, summary="Submit an augmentation job",
             responses=documented(404))
def create_job(*, body: JobCreate, response: Response, owner: CurrentKey, settings: SettingsDep, db: DbDep,
               methods: MethodsDep, registry: IndexRegistryDep) -> JobPublic:
    # 1. Check everything a worker would trip over later, so a queued job is a runnable job.
    spec = methods.get(body.method)
    body = body.model_copy(update={"params": _with_request_params(body, spec, db, owner)})
    dataset = dataset_rows.get_dataset(db, owner, body.dataset) if body.dataset else None
    index_name, model_name = _check_job(body, spec, settings, registry)
    # 2. Queue it.
    job = crud.submit(db, owner=owner, dataset=dataset, kind=spec.kind, method=spec.name, per_class=body.per_class,
                      index_name=index_name, model_name=model_name, params=body.params)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobPublic.of(job)


@router.get("", response_model=JobsPublic, summary="Your jobs, newest first")
def list_jobs(*, owner: CurrentKey, db: DbDep,
              state: Annotated[Literal["queued", "running", "succeeded", "failed", "cancelled"] | None, Query()] = None,
              dataset: Annotated[str | None, Query(max_length=40)] = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100,
              offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> JobsPublic:
    rows, count = crud.list_jobs(db, owner, state=state, dataset_id=dataset, limit=limit, offset=offset)
    return JobsPublic(data=[JobPublic.of(j) for j in rows], count=count)


@router.get("/{job_id}", response_model=JobPublic, summary="Status and progress (stage, per class, ETA)",
            responses=documented(404))
def get_job(job: JobDep) -> JobPublic:
    return JobPublic.of(job)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic, summary="Cancel a queued or running job",
             responses=documented(404, 409))
def cancel_job(job: JobDep, owner: CurrentKey, db: DbDep) -> JobPublic:
    return JobPublic.of(crud.request_cancel(db, owner, job.id))


@router.get("/{job_id}/events", response_model=list[JobEventPublic], summary="The job's history",
            responses=documented(404))
def job_events(job: JobDep, owner: CurrentKey, db: DbDep, after: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
               limit: Annotated[int, Query(ge=1, le=5000)] = 500) -> list[JobEventPublic]:
    return [JobEventPublic(id=e.id, time=e.time, kind=e.kind, stage=e.stage, done=e.done, total=e.total,
                           label=e.label, message=e.message)
            for e in crud.list_events(db, owner, job.id, after=after, limit=limit)]


def _result_key(job: Job) -> str:
    if job.state != "succeeded" or not job.result_key:
        raise ConflictError(f"job {job.id} is {job.state}; results exist once it has succeeded")
    return job.result_key


@router.get("/{job_id}/results", response_model=ResultsPublic,
            summary="Manifest of the result: image URL, label, provenance (format=jsonl streams one item a line)",
            responses={200: {"content": {"application/x-ndjson": {}}}, **documented(404, 409)})
def job_results(job: JobDep, store: StoreDep, format: Annotated[Literal["json", "jsonl"], Query()] = "json"):
    key = _result_key(job)
    items = export.manifest_items(store, key, job.id)
    if format == "jsonl":
        return StreamingResponse(export.jsonl_stream(items), media_type="application/x-ndjson")
    return ResultsPublic(job_id=job.id, count=len(items), summary=export.read_summary(store, key), items=items)


@router.get("/{job_id}/images/{file:path}", response_class=Response,
            summary="One result image (stable URL, immutable bytes); the key may also come as ?api_key=",
            responses={200: {"content": {"image/*": {}}}, **documented(404, 409)})
def job_image(job: JobDepKeyInUrl, store: StoreDep, file: Annotated[str, Path(max_length=500)]) -> Response:
    key = _result_key(job)
    if file.count("/") != 1 or file.endswith((".jsonl", ".json")):
        raise NotFoundError(f"no image {file!r} in job {job.id}")
    data = store.read_bytes(key, file)
    return Response(data, media_type=media_type(data, file), headers={
        "Cache-Control": "private, max-age=31536000, immutable", "X-Content-Type-Options": "nosniff",
        "ETag": f'"{key.rsplit("/", 1)[-1][:16]}-{file}"'})


@router.get("/{job_id}/export", summary="The result as a tar stream: ImageFolder + provenance.jsonl, or webdataset",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/x-tar": {}}}, **documented(404, 409)})
def job_export(job: JobDep, store: StoreDep,
               format: Annotated[Literal["imagefolder", "webdataset"], Query()] = "imagefolder",
               shard: Annotated[int | None, Query(ge=0, le=1_000_000)] = None,
               shard_size: Annotated[int, Query(ge=1, le=1_000_000)] = 10_000) -> StreamingResponse:
    key = _result_key(job)
    # the job's finish time as every member's mtime: the same result downloads as the same bytes
    stream = export.tar_stream(store, key, fmt=format, shard=shard, shard_size=shard_size, mtime=job.finished or 0)
    name = f"{job.id}-{format}" + (f"-{shard:05d}" if shard is not None else "") + ".tar"
    count = job.num_images or 0
    return StreamingResponse(stream, media_type="application/x-tar", headers={
        "Content-Disposition": f'attachment; filename="{name}"',
        "X-Retrogen-Shards": str(export.num_shards(count, shard_size))})
