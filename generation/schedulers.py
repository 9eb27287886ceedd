"""Scheduler registry: a short name -> a diffusers scheduler class (+ options) built from the model's config."""

from __future__ import annotations

from typing import Any

from .errors import UnknownSchedulerError

# name -> (diffusers class name, from_config overrides). "dpm++" (DPM-Solver++ 2M) is the fast default.
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {}


def register_scheduler(name: str, class_name: str, **overrides: Any) -> None:
    _SCHEDULERS[name] = (class_name, overrides)


register_scheduler("dpm++", "DPMSolverMultistepScheduler")
register_scheduler("dpm++-karras", "DPMSolverMultistepScheduler", use_karras_sigmas=True)
register_scheduler("unipc", "UniPCMultistepScheduler")
register_scheduler("euler", "EulerDiscreteScheduler")
register_scheduler("euler-a", "EulerAncestralDiscreteScheduler")
register_scheduler("ddim", "DDIMScheduler")
register_scheduler("pndm", "PNDMScheduler")
register_scheduler("lms", "LMSDiscreteScheduler")
register_scheduler("heun", "HeunDiscreteScheduler")
register_scheduler("ddpm", "DDPMScheduler")
register_scheduler("model", "")  # keep the scheduler saved with the model


def list_schedulers() -> list[str]:
    return sorted(_SCHEDULERS)


def check_scheduler(name: str) -> None:
    if name not in _SCHEDULERS:
        raise UnknownSchedulerError(name, list_schedulers())


def create_scheduler(name: str, base_scheduler: Any) -> Any:
    """A new scheduler of kind ``name`` configured like ``base_scheduler`` (betas, prediction type...)."""
    import diffusers

    check_scheduler(name)
    class_name, overrides = _SCHEDULERS[name]
    if not class_name:
        return base_scheduler
    return getattr(diffusers, class_name).from_config(base_scheduler.config, **overrides)
