"""Evaluation jobs (HTTP-free): resolve a request to stored folders, queue it as a job, run ``evaluation``.

An evaluation is an ordinary job (method ``evaluation``, kind ``retrieval``: it is CPU-light and must never
wait behind a generation), so it is persisted, claimed atomically, re-run after a crash, reports progress
and can be cancelled like every other job. Everything the worker needs is resolved and checked at
submission, under the caller's key: the datasets' and the augmentation jobs' *content keys* go into the
job's params, so the job reads exactly the (immutable) trees the caller was allowed to name, even if the
rows are deleted later. That is also why the generic ``POST /v1/jobs`` refuses this method: there a caller
could put any content key in ``params``.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

from retrogen.errors import InvalidInputError, NotFoundError, RetrogenError
from retrogen.evaluation.inputs import REAL_ONLY
from retrogen.outputs import OutputFolder
from retrogen.progress import ProgressEvent, ProgressFn

from ..core.db import Database
from ..core.errors import ConflictError
from ..core.tables import Job
from ..crud import datasets as dataset_rows
from ..crud import jobs
from .runners import MethodSpec, RunContext
from .storage import Store

METHOD = "evaluation"
MAX_AUGMENTATIONS = 8
MAX_SEEDS = 20
MAX_DRAWS = 50
MAX_STEPS = 20_000
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
# Per-job embedders are those that name no server-side file or model: raw pixels, and the built-in default
# (its weights ship with the install). ``open_clip:...`` / ``hf:...`` name checkpoints or hub downloads: the
# operator's choice, refused per job like service.domain.runners.SERVER_ONLY_PARAMS.
JOB_EMBEDDERS = re.compile(r"^(pixels(:\d{1,3})?|efficientnet-lite0(:onnx)?)$")


def check_config(config: dict[str, Any]) -> dict[str, Any]:
    """The request's ``EvaluationConfig`` fields, checked now so a queued evaluation is a runnable one."""
    from retrogen.evaluation import EvaluationConfig

    embedder = config.get("embedder")
    if embedder is not None and not (isinstance(embedder, str) and JOB_EMBEDDERS.match(embedder)):
        raise InvalidInputError(f"config.embedder {embedder!r} names a model or file on the server: set by the server "
                                "operator, not per job (per job: pixels[:SIDE] or efficientnet-lite0[:onnx])")
    parsed = EvaluationConfig.from_dict(config)
    if parsed.num_seeds > MAX_SEEDS or parsed.draws > MAX_DRAWS or parsed.num_steps > MAX_STEPS:
        raise InvalidInputError(f"config asks for more than this server's {MAX_SEEDS} seeds, {MAX_DRAWS} draws or "
                                f"{MAX_STEPS} steps")
    return dict(config)


def _resolve_augmentation(db: Database, owner: str, name: str, job_id: Any) -> dict[str, str]:
    if not NAME_RE.match(name) or name == REAL_ONLY:
        raise InvalidInputError(f"augmentation name {name!r} must be 1-64 letters, digits or _.+- and not "
                                f"{REAL_ONLY!r}")
    if not isinstance(job_id, str) or not re.match(r"^[A-Za-z0-9_-]{1,40}$", job_id):
        raise InvalidInputError(f"augmentations[{name!r}] must be a job id, got {job_id!r}")
    job = jobs.get_job(db, owner, job_id)  # another key's job: 404, like a missing one
    if job.method == METHOD:
        raise InvalidInputError(f"job {job_id} is an evaluation, not an augmentation job")
    if job.state != "succeeded" or not job.result_key:
        raise ConflictError(f"augmentation job {job_id} is {job.state}; it can be evaluated once it has succeeded")
    return {"job": job.id, "result_key": job.result_key}


def submit(db: Database, owner: str, *, train_dataset: str, test_dataset: str, augmentations: dict[str, Any],
           config: dict[str, Any]) -> Job:
    """Check and queue an evaluation job; every error is raised before anything is written."""
    train = dataset_rows.get_dataset(db, owner, train_dataset)
    test = dataset_rows.get_dataset(db, owner, test_dataset)
    if test.content_key == train.content_key:
        raise InvalidInputError("the test dataset is the train dataset; evaluate on held-out images")
    missing = sorted(set(test.classes) - set(train.classes))
    if missing:
        raise InvalidInputError(f"the test dataset has classes the train dataset lacks: {missing}")
    if not 1 <= len(augmentations) <= MAX_AUGMENTATIONS:
        raise InvalidInputError(f"give 1 to {MAX_AUGMENTATIONS} augmentations (name -> augmentation job id)")
    resolved = {name: _resolve_augmentation(db, owner, name, jid) for name, jid in augmentations.items()}
    params = {"test_dataset": test.id, "test_dataset_key": test.content_key, "augmentations": resolved,
              "config": check_config(config)}
    return jobs.submit(db, owner=owner, dataset=train, kind="retrieval", method=METHOD, per_class=0,
                       index_name=None, model_name=None, params=params)


def refuse_generic_submit(_params: dict[str, Any]) -> None:
    raise InvalidInputError("evaluation jobs are submitted with POST /v1/evaluations")


def run_evaluation(ctx: RunContext) -> None:
    """Run ``evaluation.evaluate`` and write report.json/.md/.png plus the summary.json + (empty)
    provenance.jsonl every job result has. Reports name sets by job id, never by server folders."""
    from retrogen.evaluation import EvaluationConfig, evaluate

    p = ctx.params
    augs = p["augmentations"]
    test_dir = ctx.store.local_dir(p["test_dataset_key"])
    aug_dirs = {name: ctx.store.local_dir(a["result_key"]) for name, a in augs.items()}
    try:
        report = evaluate(ctx.dataset_dir, test_dir, aug_dirs, config=EvaluationConfig.from_dict(p["config"]),
                          progress=arms_in_message(ctx.progress), should_cancel=ctx.should_cancel)
    except RetrogenError as e:  # the job's error is shown to the caller: name their ids, not our folders
        names = {str(ctx.dataset_dir): "the train dataset", str(test_dir): "the test dataset",
                 **{str(d): f"augmentation job {augs[n]['job']}" for n, d in aug_dirs.items()}}
        msg = str(e)
        for path, name in names.items():
            msg = msg.replace(path, name)
        e.args = (msg,)
        raise
    report = replace(report, arms=[replace(a, set_dirs=[augs[a.name]["job"]] if a.name in augs else [])
                                   for a in report.arms])
    report.write(ctx.out_dir)
    with OutputFolder.create(ctx.out_dir) as result:  # no images: an empty provenance.jsonl, then the summary
        result.close(json.loads(json.dumps(summary_of(report, augs), default=str)))


def arms_in_message(progress: ProgressFn) -> ProgressFn:
    """``evaluate`` names the arm being trained in ``label`` while ``done``/``total`` count runs over all arms;
    a job's ``progress.per_class`` is per class, so the arm moves into the message."""

    def emit(ev: ProgressEvent) -> None:
        if ev.label is not None:
            ev = replace(ev, label=None, message=f"{ev.label}: {ev.message}" if ev.message else ev.label)
        progress(ev)

    return emit


def summary_of(report: Any, augs: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The short form kept on the job row (the full report is ``report.json`` in the result)."""
    return {"method": METHOD, "classes": report.classes, "duration_s": report.duration_s,
            "augmentations": {name: a["job"] for name, a in augs.items()},
            "arms": {a.name: {"accuracy": a.accuracy["mean"], "std": a.accuracy["std"], "num_images": a.num_images,
                              "gain": a.gain and {k: a.gain[k] for k in ("mean", "ci_low", "ci_high")}}
                     for a in report.arms},
            "warnings": report.warnings}


def evaluations_using(db: Database, owner: str, job_id: str) -> list[Job]:
    """The caller's succeeded evaluations that used augmentation job ``job_id``, newest first."""
    return jobs.jobs_using(db, owner, method=METHOD, param_key="augmentations", value=job_id)


def evaluation_job(job: Job) -> Job:
    """``job`` if it is an evaluation; a 404 otherwise (an augmentation job is not an evaluation)."""
    if job.method != METHOD:
        raise NotFoundError(f"no evaluation {job.id!r}")
    return job


def _result_key(job: Job) -> str:
    if job.state != "succeeded" or not job.result_key:
        raise ConflictError(f"evaluation {job.id} is {job.state}; its report exists once it has succeeded"
                            + (f" (error: {job.error})" if job.error else ""))
    return job.result_key


def read_report(store: Store, job: Job) -> dict[str, Any] | None:
    """``report.json`` of a succeeded evaluation; None until then."""
    from retrogen.evaluation.report import REPORT_JSON

    if job.state != "succeeded" or not job.result_key:
        return None
    return json.loads(store.read_bytes(job.result_key, REPORT_JSON), parse_constant=lambda _c: None)


def read_chart(store: Store, job: Job) -> bytes:
    """``report.png`` of a succeeded evaluation (409 before)."""
    from retrogen.evaluation.report import REPORT_PNG

    return store.read_bytes(_result_key(evaluation_job(job)), REPORT_PNG)


SPEC = MethodSpec(METHOD, "retrieval", run_evaluation, validate=refuse_generic_submit,
                  description="downstream classifier: real-only vs real + each augmentation job (POST /v1/evaluations)")
