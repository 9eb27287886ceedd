"""Job runners: the methods a job may name, each a callable that writes one augmentation output folder.

A runner receives a :class:`RunContext` and writes an output folder (``retrogen.outputs``) at ``ctx.out_dir``,
calling ``ctx.progress`` and polling ``ctx.should_cancel``. ``kind`` picks the worker lane: ``retrieval`` jobs
never wait behind ``generation`` ones. Heavy libraries are imported inside the runners, never at import time.
The registry the app uses is assembled in ``service.wiring``; tests register fakes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrogen.errors import InvalidInputError, NotFoundError, UnknownComponentError
from retrogen.progress import CancelFn, ProgressFn

from ..core.config import Settings
from .indexes import IndexRegistry, LoadedIndex
from .queries import check_classifier_allowed
from .storage import Store

if TYPE_CHECKING:
    from retrogen.retrieval import RetrievalConfig

KINDS = ("retrieval", "generation")
#: job params that are not RetrievalConfig fields: how the job asks, not how it selects
RETRIEVAL_REQUEST_PARAMS = ("mode", "classes", "holdout")

# Parameters that name server-side files or models, pick hardware, or lift safety limits: the operator's
# choice (settings), never a job's. A job naming one gets a 422 saying so.
SERVER_ONLY_PARAMS = {
    "retrieval": ("label_check_embedder", "max_pixels"),
    "generation": ("ip_adapter", "device", "local_files_only", "enable_compile", "enable_cpu_offload"),
}


@dataclass
class RunContext:
    """Everything a runner needs; ``params`` are the job's method parameters (validated at submission)."""

    job_id: str
    dataset_dir: Path | None  # None for a names-only job (params["classes"])
    out_dir: Path
    per_class: int
    params: dict[str, Any]
    index_name: str | None
    model_name: str | None
    settings: Settings
    index_registry: IndexRegistry
    store: Store  # runners that read other stored trees (evaluations) need it
    progress: ProgressFn
    should_cancel: CancelFn
    artifacts_dir: Path | None = None
    holdout_dir: Path | None = None  # a retrieval job's held-out set (params["holdout"], a dataset id)


Runner = Callable[[RunContext], Any]


@dataclass(frozen=True)
class SubmitCheck:
    """A request about to be queued, with the configured index / model it would run on: what a method's
    ``check`` may consult to refuse, at submission, a job that could only fail."""

    params: dict[str, Any]
    index_name: str | None
    model_name: str | None
    settings: Settings
    index_registry: IndexRegistry


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: str  # retrieval | generation
    runner: Runner
    needs_index: bool = False
    needs_model: bool = False
    description: str = ""
    validate: Callable[[dict[str, Any]], None] | None = None  # raises InvalidInputError before the job is queued
    # raises before the job is queued when the configured index / model cannot run these params; cheap (it may
    # read a manifest, never load a model)
    check: Callable[[SubmitCheck], None] | None = None


@dataclass
class MethodRegistry:
    """Method name -> spec."""

    methods: dict[str, MethodSpec] = field(default_factory=dict)

    def register(self, spec: MethodSpec) -> MethodSpec:
        if spec.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {spec.kind!r}")
        self.methods[spec.name] = spec
        return spec

    def get(self, name: str) -> MethodSpec:
        if name not in self.methods:
            raise UnknownComponentError("method", name, list(self.methods))
        return self.methods[name]

    def names(self) -> list[str]:
        return sorted(self.methods)


def _refuse_server_only(kind: str, params: dict[str, Any]) -> None:
    named = sorted(set(params) & set(SERVER_ONLY_PARAMS[kind]))
    if named:
        raise InvalidInputError(f"params {named} are set by the server operator, not per job")


def retrieval_settings(params: dict[str, Any]) -> tuple[str, RetrievalConfig]:
    """(mode, RetrievalConfig) from a job's params; InvalidInputError names what is wrong.

    The mode defaults to ``image`` for a dataset and ``text`` for class names (``params.classes``)."""
    from retrogen.retrieval import RetrievalConfig
    from retrogen.retrieval.modes import mode_name, parse_mode

    _refuse_server_only("retrieval", params)
    mode = params.get("mode") or ("text" if params.get("classes") else "image")
    try:
        sources = parse_mode(mode)
    except InvalidInputError as e:
        raise InvalidInputError(f"params.{e}") from None
    config = RetrievalConfig.from_dict({k: v for k, v in params.items() if k not in RETRIEVAL_REQUEST_PARAMS})
    return mode_name(sources), config


def validate_retrieval(params: dict[str, Any]) -> None:
    retrieval_settings(params)


def check_retrieval(sub: SubmitCheck) -> None:
    """Refuse, from the index's manifest (no model is loaded), what it cannot serve: text queries or the label
    check on an image-only embedder, caption mode without a caption index, thresholds on scores it lacks, a
    safety classifier the operator has not allowed, image queries in a names-only job."""
    from retrogen.retrieval.modes import parse_mode
    from retrogen.retrieval.safety import check_columns

    mode, config = retrieval_settings(sub.params)
    sources = parse_mode(mode)
    if sub.params.get("classes") and "image" in sources:
        raise InvalidInputError(f"params.mode={mode!r} searches with a dataset's images; a job with class names "
                                "only may use text, caption or text+caption")
    needs_text = [what for what, on in ((f"params.mode={mode!r}", "text" in sources),
                                        ("params.label_check", config.label_check),
                                        ("params.caption_rerank='text'", config.caption_rerank == "text")) if on]
    embedder = sub.index_registry.embedder_of(sub.index_name)  # the index is there (404 otherwise)
    if needs_text and not embedder.supports_text:
        raise InvalidInputError(f"{' and '.join(needs_text)} need(s) an image-text embedder; index "
                                f"{embedder.index!r} uses the image-only embedder {embedder.name!r}")
    manifest = sub.index_registry.manifest(sub.index_name)
    if "caption" in sources and not manifest.captions:
        raise InvalidInputError(f"params.mode={mode!r} matches captions; index {sub.index_name!r} has no caption "
                                "index (its corpus has no captions, or it predates them: `retrogen index captions`)")
    check_columns(config, manifest)
    check_classifier_allowed(config.safety_classifier, sub.settings.safety_classifiers,
                             what="params.safety_classifier")


def validate_generation(params: dict[str, Any]) -> None:
    from retrogen.generation import GenerationConfig
    from retrogen.generation.schedulers import check_scheduler

    _refuse_server_only("generation", params)
    check_scheduler(GenerationConfig.from_dict(params).scheduler)


def run_retrieval(ctx: RunContext) -> Any:
    """``retrieval`` through ``augment_by_retrieval`` on a configured index (loaded once per process)."""
    from retrogen.retrieval import augment_by_retrieval, augment_from_names

    mode, config = retrieval_settings(ctx.params)
    loaded = ctx.index_registry.get(ctx.index_name)
    kwargs = {"corpus": loaded.corpus, "per_class": ctx.per_class, "mode": mode, "config": config,
              "embedder": loaded.embedder, "holdout_dir": ctx.holdout_dir, "progress": ctx.progress,
              "should_cancel": ctx.should_cancel}
    if ctx.dataset_dir is None:
        result = augment_from_names(list(ctx.params["classes"]), ctx.out_dir, **kwargs)
    else:
        result = augment_by_retrieval(ctx.dataset_dir, ctx.out_dir, **kwargs)
    publish_source_uris(ctx.out_dir, loaded)
    return result


def publish_source_uris(out_dir: Path, loaded: LoadedIndex) -> None:
    """Rewrite each record's ``source_uri`` to its public form (relative to the corpus source or the index, see
    ``LoadedIndex.public_source_uri``) before the result is stored: results are shown to the job's owner,
    who has no business with the server's folders."""
    from retrogen.outputs import OutputFolder

    out = OutputFolder(out_dir)
    records = out.records()
    ids = sorted({int(r["sample_id"]) for r in records if r.get("sample_id") is not None})
    metas = {int(m["id"]): m for m in loaded.corpus.metadata(ids)} if ids else {}
    for r in records:
        meta = metas.get(int(r["sample_id"])) if r.get("sample_id") is not None else None
        if meta is not None:
            r["source_uri"] = loaded.public_source_uri(meta)
    out.rewrite(records, [], out.summary())


def generation_runner(method: str) -> Runner:
    """A runner for generation method ``method`` on a configured model."""

    def run(ctx: RunContext) -> Any:
        from retrogen.generation import GenerationConfig, augment_by_generation
        from retrogen.generation.pipelines import cached_pipelines

        models = ctx.settings.models
        if ctx.model_name not in models:
            raise NotFoundError(f"unknown model {ctx.model_name!r}; configured: {', '.join(models) or '(none)'}")
        # the worker keeps loaded pipelines across jobs: an LRU within pipeline_cache_gb, else the last model only
        budget_gb = ctx.settings.pipeline_cache_gb
        pipelines = cached_pipelines(int(budget_gb * (1 << 30)) if budget_gb is not None else None)
        return augment_by_generation(ctx.dataset_dir, ctx.out_dir, model=models[ctx.model_name], method=method,
                                     per_class=ctx.per_class, config=GenerationConfig.from_dict(ctx.params),
                                     artifacts_dir=ctx.artifacts_dir, progress=ctx.progress,
                                     should_cancel=ctx.should_cancel, pipelines=pipelines)

    return run
