"""API shapes: ``*Create`` in, ``*Public`` out, ``*sPublic(data, count)`` for lists."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ..core.tables import Dataset, Job

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]

#: A job's ``params`` (or an evaluation's ``config``) as JSON: stored on the row and returned by every listing,
#: so it is kept small (a 24 MB ``templates`` list was once stored and listed).
MAX_PARAMS_BYTES = 64 * 1024
#: Largest offset / id a query may name: beyond any row count, within every database's integer range.
MAX_OFFSET = 2**31 - 1


def _finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where or 'value'} must be a finite number (JSON has no NaN or Infinity)")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite(v, f"{where}[{i}]")


def _small_json(value: dict[str, Any]) -> dict[str, Any]:
    """Finite numbers only (NaN could be stored but never served as JSON) and at most MAX_PARAMS_BYTES."""
    _finite(value, "")
    size = len(json.dumps(value, default=str))
    if size > MAX_PARAMS_BYTES:
        raise ValueError(f"is {size} bytes as JSON; at most {MAX_PARAMS_BYTES} are accepted")
    return value


SmallJson = Annotated[dict[str, Any], AfterValidator(_small_json)]
def _printable(name: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError("must not contain control characters (NUL, newlines, ...)")
    return name


#: Names stored in the database: no NUL (PostgreSQL text cannot hold it) nor other control characters.
Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_printable)]


class ErrorItem(BaseModel):
    """One invalid part of a request: where (``["body", "per_class"]``), what is wrong, and its kind."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorPublic(BaseModel):
    """Every error answer: ``detail`` is one readable line; ``errors`` lists each invalid field when the request
    failed validation (422), and is empty otherwise."""

    detail: str
    errors: list[ErrorItem] = Field(default_factory=list)


class DatasetPublic(BaseModel):
    id: str
    name: str
    num_images: int
    num_bytes: int
    classes: dict[str, int] = Field(description="label -> number of images")
    created: float

    @classmethod
    def of(cls, ds: Dataset) -> DatasetPublic:
        return cls(id=ds.id, name=ds.name, num_images=ds.num_images, num_bytes=ds.num_bytes,
                   classes=dict(ds.classes), created=ds.created)


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int


class ManifestImage(BaseModel):
    """One image of a JSON-manifest upload: base64 ``data``, or a server-side ``path`` under the server root."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1, max_length=200)
    data: str | None = Field(None, description="base64-encoded image file")
    path: str | None = Field(None, max_length=4096, description="file on the server, under its server_root")
    filename: str | None = Field(None, min_length=1, max_length=200)

    def model_post_init(self, _ctx: Any) -> None:
        if (self.data is None) == (self.path is None):
            raise ValueError("give exactly one of data or path")


class DatasetManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name = "dataset"
    images: list[ManifestImage] = Field(min_length=1)


_ClassName = Annotated[str, Field(min_length=1, max_length=200)]


class JobCreate(BaseModel):
    """An augmentation request. ``method``: ``retrieval`` (``params.mode``: image | text | caption | mixed, or a
    "+"-joined set such as text+caption) or a generation method (``prompt``, ``img2img``, ...); ``params`` are
    the method's settings (``RetrievalConfig`` / ``GenerationConfig`` fields). A retrieval job may name
    ``classes`` instead of a ``dataset`` (no images needed; modes text and caption), and a ``holdout`` dataset
    nothing returned may near-duplicate."""

    model_config = ConfigDict(extra="forbid")

    dataset: str | None = Field(None, min_length=1, max_length=40)
    classes: list[_ClassName] | None = Field(None, min_length=1, max_length=10_000,
                                             description="class names, instead of a dataset (retrieval)")
    holdout: str | None = Field(None, min_length=1, max_length=40,
                                description="an uploaded dataset of held-out images to protect (retrieval)")
    method: str = Field(min_length=1, max_length=50)
    per_class: int = Field(ge=1, le=MAX_OFFSET)
    index: str | None = Field(None, max_length=200, description="configured index name (retrieval)")
    model: str | None = Field(None, max_length=200, description="configured model name (generation)")
    params: SmallJson = Field(default_factory=dict, description=f"at most {MAX_PARAMS_BYTES} bytes as JSON")


    @model_validator(mode="after")
    def _dataset_or_classes(self) -> JobCreate:
        if (self.dataset is None) == (self.classes is None):
            raise ValueError("give exactly one of 'dataset' (an uploaded dataset id) and 'classes' (class names)")
        if self.classes is not None and len(json.dumps(self.classes)) > MAX_PARAMS_BYTES:
            raise ValueError(f"'classes' must be at most {MAX_PARAMS_BYTES} bytes as JSON (it is stored on the job)")
        return self


class JobProgress(BaseModel):
    model_config = ConfigDict(extra="allow")

    stage: str | None = None
    done: int = 0
    total: int = 0
    per_class: dict[str, dict[str, int]] = Field(default_factory=dict)
    eta_s: float | None = None


class JobPublic(BaseModel):
    id: str
    dataset: str | None  # None for a names-only job: its classes are in params.classes
    method: str
    kind: str
    per_class: int
    index: str | None
    model: str | None
    params: dict[str, Any]
    state: JobState
    cancel_requested: bool
    attempts: int
    progress: JobProgress
    error: str | None
    num_images: int | None
    summary: dict[str, Any] | None
    created: float
    started: float | None
    finished: float | None
    results_url: str | None = None

    @classmethod
    def of(cls, job: Job) -> JobPublic:
        return cls(id=job.id, dataset=job.dataset_id or None, method=job.method, kind=job.kind, per_class=job.per_class,
                   index=job.index_name, model=job.model_name, params=dict(job.params or {}), state=job.state,
                   cancel_requested=bool(job.cancel_requested), attempts=job.attempts,
                   progress=JobProgress(**(job.progress or {})), error=job.error, num_images=job.num_images,
                   summary=job.summary, created=job.created, started=job.started, finished=job.finished,
                   results_url=f"/v1/jobs/{job.id}/results" if job.state == "succeeded" else None)


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class JobEventPublic(BaseModel):
    id: int
    time: float
    kind: str
    stage: str | None = None
    done: int | None = None
    total: int | None = None
    label: str | None = None
    message: str | None = None


class ResultItem(BaseModel):
    url: str
    label: str
    file: str
    provenance: dict[str, Any]


class ResultsPublic(BaseModel):
    job_id: str
    count: int
    summary: dict[str, Any] | None
    items: list[ResultItem]


class ReadinessPublic(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, str] = Field(description="check -> ok | error: why")


class ModelsPublic(BaseModel):
    models: dict[str, str] = Field(description="configured generation model name -> hub id or local dir")
    methods: dict[str, str] = Field(description="method name -> kind (retrieval | generation)")
    indexes: list[str]


class EvaluationCreate(BaseModel):
    """A downstream evaluation: real-only vs real + each augmentation job's result, tested on ``test_dataset``."""

    model_config = ConfigDict(extra="forbid")

    train_dataset: str = Field(min_length=1, max_length=40, description="dataset id: the real training images")
    test_dataset: str = Field(min_length=1, max_length=40, description="dataset id: held-out images, same classes")
    augmentations: dict[str, str] = Field(max_length=64, description="arm name -> succeeded augmentation job id")
    config: SmallJson = Field(default_factory=dict, description="EvaluationConfig fields")


class EvaluationPublic(JobPublic):
    """An evaluation job; ``report`` is report.json once it has succeeded."""

    report: dict[str, Any] | None = None
    chart_url: str | None = None
    gallery_urls: dict[str, str] = Field(default_factory=dict, description="arm name -> augmentation gallery")

    @classmethod
    def of_evaluation(cls, job: Job, report: dict[str, Any] | None = None) -> EvaluationPublic:
        augs = (job.params or {}).get("augmentations", {})
        return cls(**JobPublic.of(job).model_dump(), report=report,
                   chart_url=f"/v1/evaluations/{job.id}/report.png" if job.state == "succeeded" else None,
                   gallery_urls={name: f"/gallery/{a['job']}" for name, a in augs.items()})
