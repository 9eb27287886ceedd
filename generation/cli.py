"""``retrogen augment generate``: the generation backend from the command line, with progress bars.

The options are :class:`GenerationConfig`'s fields (``retrogen.config_cli``) plus the command's own. Only typer
and light modules load at import time; torch and diffusers load when the command runs.
"""

# No ``from __future__ import annotations``: typer reads these annotations as objects.

from pathlib import Path
from typing import Any

import typer

from retrogen.config_cli import config_options
from retrogen.outputs import AugmentResult

from .config import GenerationConfig

DEFAULT_ARTIFACTS_DIR = Path("~/.cache/retrogen/artifacts")


class _Bars:
    """One tqdm bar per (stage, class); training bars show the latest loss."""

    def __init__(self) -> None:
        self.bars: dict = {}

    def __call__(self, event: Any) -> None:
        from tqdm import tqdm

        if event.stage == "load":
            if event.done == event.total and event.message:
                tqdm.write(f"loaded: {event.message}")
            return
        key = (event.stage, event.label)
        bar = self.bars.get(key)
        if bar is None:
            desc = f"{'training' if event.stage == 'train' else 'generating'} {event.label}"
            bar = self.bars[key] = tqdm(total=event.total, desc=desc, unit="step" if event.stage == "train" else "img",
                                        leave=True, dynamic_ncols=True)
        bar.update(event.done - bar.n)
        if "loss" in event.extra:
            bar.set_postfix(loss=f"{event.extra['loss']:.4f}")
        if event.done >= event.total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _quiet_library_bars() -> None:
    """Our per-class bars replace diffusers' and transformers' per-component loading bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _done_line(result: AugmentResult, method: str, out: Path) -> str:
    s = result.summary
    trained = sum(not a["reused"] for a in s["artifacts"].values())
    extra = f"; artefacts trained {trained}, reused {len(s['artifacts']) - trained}" if s["artifacts"] else ""
    return (f"generated {len(result.records)} images for {len(s['per_class'])} classes by {method} into {out} "
            f"in {s['duration_s']:.1f} s ({s['images_per_s']:.2f} images/s){extra}")


@config_options(GenerationConfig)
def generate(
    *,
    model: str = typer.Option(..., "--model", help="Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) "
                                                   "or local diffusers folder."),
    dataset: Path = typer.Option(..., "--dataset", help="ImageFolder: one folder of images per class."),
    method: str = typer.Option(..., "--method", help="prompt, img2img, variation, textual-inversion, dreambooth."),
    per_class: int = typer.Option(..., "--per-class", help="Images to generate per class."),
    out: Path = typer.Option(..., "--out", help="Output folder: new or empty (or --overwrite)."),
    artifacts_dir: Path = typer.Option(DEFAULT_ARTIFACTS_DIR, "--artifacts-dir",
                                       help="Personalisation artefact cache."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier generation output in --out."),
    config: GenerationConfig,
) -> None:
    """Generate N images per class with Stable Diffusion; write images + provenance.jsonl + summary.json."""
    from .augment import augment_by_generation

    _quiet_library_bars()
    bars = _Bars()
    try:
        result = augment_by_generation(dataset, out, model=model, method=method, per_class=per_class, config=config,
                                       artifacts_dir=artifacts_dir.expanduser(), progress=bars, overwrite=overwrite)
    finally:
        bars.close()
    typer.echo(_done_line(result, method, out))
