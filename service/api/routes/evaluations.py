"""``/v1/evaluations``: queue a downstream evaluation of augmentation jobs, read its report and chart.

Evaluations are jobs (``service.domain.evaluations``): follow or cancel them under ``/v1/jobs/{id}`` too. The chart
is served from the job's stored result, so its URL is stable once the job has succeeded.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from ...domain import evaluations
from ..deps import CurrentKey, DbDep, JobDep, MethodsDep, StoreDep
from ..errors import documented
from ..schemas import EvaluationCreate, EvaluationPublic

router = APIRouter(tags=["evaluations"])


@router.post("/v1/evaluations", status_code=202, response_model=EvaluationPublic,
             summary="Queue an evaluation: real-only vs real + each augmentation job, on a held-out dataset",
             responses=documented(404, 409))
def create_evaluation(*, body: EvaluationCreate, response: Response, owner: CurrentKey, db: DbDep,
                      methods: MethodsDep) -> EvaluationPublic:
    methods.get(evaluations.METHOD)  # a registry without it (a test's, say) has no worker for it: refuse now
    job = evaluations.submit(db, owner, train_dataset=body.train_dataset, test_dataset=body.test_dataset,
                             augmentations=body.augmentations, config=body.config)
    response.headers["Location"] = f"/v1/evaluations/{job.id}"
    return EvaluationPublic.of_evaluation(job)


@router.get("/v1/evaluations/{job_id}", response_model=EvaluationPublic,
            summary="State and progress; the full report once it has succeeded", responses=documented(404))
def get_evaluation(job: JobDep, store: StoreDep) -> EvaluationPublic:
    job = evaluations.evaluation_job(job)
    return EvaluationPublic.of_evaluation(job, evaluations.read_report(store, job))


@router.get("/v1/evaluations/{job_id}/report.png", summary="The report's chart (accuracy, cost per image)",
            response_class=Response, responses={200: {"content": {"image/png": {}}}, **documented(404, 409)})
def evaluation_chart(job: JobDep, store: StoreDep) -> Response:
    return Response(evaluations.read_chart(store, job), media_type="image/png", headers={
        "Cache-Control": "private, max-age=31536000, immutable", "X-Content-Type-Options": "nosniff"})


@router.get("/v1/jobs/{job_id}/evaluations", response_model=list[EvaluationPublic],
            summary="Succeeded evaluations that used this augmentation job, newest first (the gallery shows the chart)",
            responses=documented(404))
def evaluations_of_job(job: JobDep, owner: CurrentKey, db: DbDep) -> list[EvaluationPublic]:
    return [EvaluationPublic.of_evaluation(e) for e in evaluations.evaluations_using(db, owner, job.id)]
