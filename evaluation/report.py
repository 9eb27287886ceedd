"""``EvaluationReport`` and its three outputs: ``report.json``, ``report.md`` (a Markdown table), ``report.png``."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from retrogen.fileio import atomic_write_bytes, atomic_write_json

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"


@dataclass(frozen=True)
class ArmResult:
    """One training set: real only, or real + one augmentation set."""

    name: str
    set_dir: str | None
    num_images: int  # augmentation images used (after the cap); 0 for real only
    counts: dict[str, int]  # augmentation images used per class
    accuracy: dict[str, Any]  # mean, std, per_seed
    per_class: dict[str, float]  # top-1 per class, mean over seeds
    gain: dict[str, Any] | None  # over real only: mean, ci_low, ci_high, confidence; None for real only
    cost: dict[str, Any]


@dataclass(frozen=True)
class EvaluationReport:
    classes: list[str]
    arms: list[ArmResult]
    config: dict[str, Any]
    counts: dict[str, dict[str, int]]  # "train" / "test" -> class -> images
    leakage: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    created: str = ""
    retrogen_version: str = ""

    def arm(self, name: str) -> ArmResult:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvaluationReport:
        """The inverse of ``to_dict`` (e.g. a report.json read back)."""
        return cls(**{**d, "arms": [ArmResult(**a) for a in d["arms"]]})

    @classmethod
    def load(cls, path: str | Path) -> EvaluationReport:
        """Read ``report.json`` (a file, or the folder holding it)."""
        p = Path(path)
        return cls.from_dict(json.loads((p / REPORT_JSON if p.is_dir() else p).read_text()))

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write report.json, report.md and report.png into ``out_dir``; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / REPORT_JSON, self.to_dict())
        atomic_write_bytes(out / REPORT_MD, markdown(self).encode())
        atomic_write_bytes(out / REPORT_PNG, chart_png(self))
        return {"json": out / REPORT_JSON, "markdown": out / REPORT_MD, "chart": out / REPORT_PNG}


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table_rows(report: EvaluationReport) -> list[list[str]]:
    rows = []
    for a in report.arms:
        acc = f"{100 * a.accuracy['mean']:.1f} ± {100 * a.accuracy['std']:.1f}"
        if a.gain is None:
            gain = "–"
        else:
            gain = (f"{100 * a.gain['mean']:+.1f} [{100 * a.gain['ci_low']:+.1f}, {100 * a.gain['ci_high']:+.1f}]")
        c = a.cost
        rows.append([a.name, str(a.num_images), acc, gain, _fmt(c.get("seconds_per_image"), ".3g"),
                     _fmt(c.get("images_per_s"), ".3g"), _fmt(c.get("gpu_seconds_per_image"), ".3g")])
    return rows


def markdown(report: EvaluationReport) -> str:
    seeds = len(report.arms[0].accuracy["per_seed"]) if report.arms else 0
    conf = next((a.gain["confidence"] for a in report.arms if a.gain), 0.95)
    head = ["method", "aug images", f"top-1 % (mean ± std, {seeds} seeds)", f"gain pts [{conf:.0%} CI]",
            "s / image", "images / s", "GPU-s / image"]
    cfg = report.config
    features = f" on {cfg.get('embedder')} features" if cfg.get("classifier") == "linear" else ""
    lines = [f"Classifier: {cfg.get('classifier')}{features}; train {sum(report.counts['train'].values())} real "
             f"images, test {sum(report.counts['test'].values())}.", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("| " + " | ".join(["---"] * len(head)) + " |")
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    lines.append("")
    lines.append("Per-class top-1 % (mean over seeds):")
    lines.append("")
    lines.append("| class | " + " | ".join(a.name for a in report.arms) + " |")
    lines.append("| --- |" + " --- |" * len(report.arms))
    for c in report.classes:
        lines.append(f"| {c} | " + " | ".join(f"{100 * a.per_class.get(c, float('nan')):.1f}" for a in report.arms) + " |")
    if report.warnings:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in report.warnings]
    return "\n".join(lines) + "\n"


def chart_png(report: EvaluationReport) -> bytes:
    """Accuracy per method with std error bars (left); cost per image on a log axis (right)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [a.name for a in report.arms]
    means = [100 * a.accuracy["mean"] for a in report.arms]
    stds = [100 * a.accuracy["std"] for a in report.arms]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(names) + 4), 3.8))
    ax1.bar(range(len(names)), means, yerr=stds, capsize=4, color="#4c72b0")
    ax1.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax1.set_ylabel("top-1 accuracy (%)")
    ax1.set_ylim(max(0.0, min(means) - 2 * max(stds + [1.0]) - 5), min(100.0, max(means) + 2 * max(stds + [1.0]) + 2))
    ax1.set_title("accuracy (mean ± std over seeds)")
    costs = [(a.name, a.cost.get("seconds_per_image")) for a in report.arms]
    costs = [(n, c) for n, c in costs if c]
    if costs:
        ax2.bar(range(len(costs)), [c for _, c in costs], color="#dd8452")
        ax2.set_xticks(range(len(costs)), [n for n, _ in costs], rotation=30, ha="right")
        ax2.set_yscale("log")
    else:
        ax2.text(0.5, 0.5, "no cost recorded", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_ylabel("wall seconds per image (log)")
    ax2.set_title("cost per augmentation image")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
