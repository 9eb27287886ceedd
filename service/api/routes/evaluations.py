"""``/v1/evaluations``: queue a downstream evaluation of augmentation jobs, read its report and chart.

Evaluations are jobs (``service.evaluations``): follow or cancel them under ``/v1/jobs/{id}`` too. The chart
is served from the job's stored result, so its URL is stable once the job has succeeded.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Response

from retrogen.evaluation.report import REPORT_JSON, REPORT_PNG
from retrogen.service import evaluations
from retrogen.service.api.deps import CurrentKey, DbDep, JobDep, MethodsDep, StoreDep
from retrogen.service.errors import ConflictError, NotFoundError
from retrogen.service.models import Job
from retrogen.service.schemas import EvaluationCreate, EvaluationPublic

router = APIRouter(tags=["evaluations"])


def _evaluation(job: Job) -> Job:
    if job.method != evaluations.METHOD:
        raise NotFoundError(f"no evaluation {job.id!r}")
    return job


def _result_key(job: Job) -> str:
    if job.state != "succeeded" or not job.result_key:
        raise ConflictError(f"evaluation {job.id} is {job.state}; its report exists once it has succeeded"
                            + (f" (error: {job.error})" if job.error else ""))
    return job.result_key


@router.post("/v1/evaluations", status_code=202, response_model=EvaluationPublic,
             summary="Queue an evaluation: real-only vs real + each augmentation job, on a held-out dataset")
def create_evaluation(body: EvaluationCreate, response: Response, owner: CurrentKey, db: DbDep,
                      methods: MethodsDep) -> EvaluationPublic:
    methods.get(evaluations.METHOD)  # a registry without it (a test's, say) has no worker for it: refuse now
    job = evaluations.submit(db, owner, train_dataset=body.train_dataset, test_dataset=body.test_dataset,
                             augmentations=body.augmentations, config=body.config)
    response.headers["Location"] = f"/v1/evaluations/{job.id}"
    return EvaluationPublic.of_evaluation(job)


@router.get("/v1/evaluations/{job_id}", response_model=EvaluationPublic,
            summary="State and progress; the full report once it has succeeded")
def get_evaluation(job: JobDep, store: StoreDep) -> EvaluationPublic:
    job = _evaluation(job)
    report = None
    if job.state == "succeeded" and job.result_key:
        report = json.loads(store.read_bytes(job.result_key, REPORT_JSON), parse_constant=lambda _c: None)
    return EvaluationPublic.of_evaluation(job, report)


@router.get("/v1/evaluations/{job_id}/report.png", summary="The report's chart (accuracy, cost per image)",
            response_class=Response, responses={200: {"content": {"image/png": {}}}})
def evaluation_chart(job: JobDep, store: StoreDep) -> Response:
    key = _result_key(_evaluation(job))
    return Response(store.read_bytes(key, REPORT_PNG), media_type="image/png", headers={
        "Cache-Control": "private, max-age=31536000, immutable", "X-Content-Type-Options": "nosniff"})


@router.get("/v1/jobs/{job_id}/evaluations", response_model=list[EvaluationPublic],
            summary="Succeeded evaluations that used this augmentation job, newest first (the gallery shows the chart)")
def evaluations_of_job(job: JobDep, owner: CurrentKey, db: DbDep) -> list[EvaluationPublic]:
    return [EvaluationPublic.of_evaluation(e) for e in evaluations.evaluations_using(db, owner, job.id)]
