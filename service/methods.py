"""Augmentation methods a job may name, mapped to runner callables (tests register fakes).

A runner receives a :class:`RunContext` and writes an augmentation output folder (ImageFolder +
``provenance.jsonl`` + ``summary.json``) at ``ctx.out_dir``, calling ``ctx.progress`` and polling
``ctx.should_cancel``. ``kind`` picks the queue: ``retrieval`` jobs never wait behind ``generation`` ones.
Heavy libraries are imported inside the runners, never at import time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrogen.errors import InvalidInputError, NotFoundError, UnknownComponentError
from retrogen.progress import CancelFn, ProgressFn

log = logging.getLogger(__name__)

KINDS = ("retrieval", "generation")
RETRIEVAL_MODES = ("image", "text", "mixed")


@dataclass
class RunContext:
    """Everything a runner needs; ``params`` are the job's method parameters (validated by the runner)."""

    job_id: str
    dataset_dir: Path
    out_dir: Path
    per_class: int
    params: dict[str, Any]
    index: str | None
    model: str | None
    settings: Any
    index_registry: Any  # service.indexes.IndexRegistry
    progress: ProgressFn
    should_cancel: CancelFn
    artifacts_dir: Path | None = None
    store: Any = None  # service.storage.Store: runners that read other stored trees (evaluations) need it


Runner = Callable[[RunContext], Any]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: str  # retrieval | generation
    runner: Runner
    needs_index: bool = False
    needs_model: bool = False
    description: str = ""
    validate: Callable[[dict[str, Any]], None] | None = None  # raises InvalidInputError before the job is queued


@dataclass
class MethodRegistry:
    """Method name -> spec. ``default_registry()`` holds the real backends; tests build their own."""

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


# Parameters that name server-side files or models, pick hardware, or lift safety limits: the operator's
# choice (settings), never a job's. A job naming one gets a 422 saying so.
SERVER_ONLY_PARAMS = {
    "retrieval": ("label_check_embedder", "max_pixels"),
    "generation": ("ip_adapter", "device", "local_files_only", "enable_compile", "enable_cpu_offload"),
}


def _refuse_server_only(kind: str, params: dict[str, Any]) -> None:
    named = sorted(set(params) & set(SERVER_ONLY_PARAMS[kind]))
    if named:
        raise InvalidInputError(f"params {named} are set by the server operator, not per job")


def _retrieval_config(params: dict[str, Any]) -> tuple[str, Any]:
    from retrogen.retrieval import RetrievalConfig

    _refuse_server_only("retrieval", params)
    params = dict(params)
    mode = params.pop("mode", "image")
    if mode not in RETRIEVAL_MODES:
        raise InvalidInputError(f"params.mode must be one of {', '.join(RETRIEVAL_MODES)}, got {mode!r}")
    valid = set(RetrievalConfig.__dataclass_fields__)
    unknown = sorted(set(params) - valid)
    if unknown:
        raise InvalidInputError(f"unknown retrieval parameter(s) {unknown}; valid: mode, {', '.join(sorted(valid))}")
    try:
        config = RetrievalConfig(**_tuples(params))
        config.check()
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"bad retrieval parameters: {e}") from None
    return mode, config


def validate_retrieval(params: dict[str, Any]) -> None:
    _retrieval_config(params)


def validate_generation(params: dict[str, Any]) -> None:
    from retrogen.generation import GenerationConfig

    _refuse_server_only("generation", params)
    try:
        GenerationConfig.from_dict(params)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"bad generation parameters: {e}") from None


def run_retrieval(ctx: RunContext) -> Any:
    """``retrieval`` through ``retrieval.augment_by_retrieval`` on a configured index (loaded once per process)."""
    from retrogen.retrieval import augment_by_retrieval

    mode, config = _retrieval_config(ctx.params)
    loaded = ctx.index_registry.get(ctx.index)
    return augment_by_retrieval(ctx.dataset_dir, ctx.out_dir, index=loaded.index, per_class=ctx.per_class, mode=mode,
                                config=config, embedder=loaded.embedder, progress=ctx.progress,
                                should_cancel=ctx.should_cancel)


def _tuples(params: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if k == "templates" and isinstance(v, list) else v for k, v in params.items()}


def make_generation_runner(method: str) -> Runner:
    def run(ctx: RunContext) -> Any:
        from retrogen.generation import GenerationConfig, augment_by_generation

        models = dict(getattr(ctx.settings, "models", {}) or {})
        if ctx.model not in models:
            raise NotFoundError(f"unknown model {ctx.model!r}; configured: {', '.join(models) or '(none)'}")
        config = GenerationConfig.from_dict(ctx.params)
        return augment_by_generation(ctx.dataset_dir, ctx.out_dir, model=models[ctx.model], method=method,
                                     per_class=ctx.per_class, config=config, artifacts_dir=ctx.artifacts_dir,
                                     progress=ctx.progress, should_cancel=ctx.should_cancel)

    return run


_default: MethodRegistry | None = None
_default_lock = threading.Lock()


def default_registry() -> MethodRegistry:
    """``retrieval``, every generation method (``generation.list_methods()``; importing it loads no torch) and
    ``evaluation`` (submitted through ``POST /v1/evaluations`` only)."""
    global _default
    with _default_lock:
        if _default is None:
            reg = MethodRegistry()
            reg.register(MethodSpec("retrieval", "retrieval", run_retrieval, needs_index=True, validate=validate_retrieval,
                                    description="nearest corpus neighbours; params.mode: image | text | mixed"))
            try:
                from retrogen.generation import list_methods
            except ImportError:  # pragma: no cover - generation is part of the install
                list_methods = list  # type: ignore[assignment]
            for name in list_methods():
                reg.register(MethodSpec(name, "generation", make_generation_runner(name), needs_model=True,
                                        validate=validate_generation,
                                        description=f"Stable Diffusion: {name}"))
            from retrogen.service.evaluations import SPEC as evaluation_spec

            reg.register(evaluation_spec)
            _default = reg
        return _default
