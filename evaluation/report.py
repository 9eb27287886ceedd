"""``EvaluationReport`` and its three outputs: ``report.json``, ``report.md`` (tables + the protocol in words),
``report.png`` (accuracy from 0, gain with its interval, cost per image)."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from retrogen.fileio import atomic_write_bytes, atomic_write_json

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"


@dataclass(frozen=True)
class ArmResult:
    """One training set: real only, or real + one augmentation set."""

    name: str
    set_dirs: list[str]  # the augmentation folder(s) over the draws; [] for real only
    num_images: float  # augmentation images used per draw (mean, after the cap and exclusions); 0 for real only
    counts: dict[str, int]  # augmentation images per class (first draw)
    accuracy: dict[str, Any]  # mean and std over draws (over seeds with one draw), per_draw, per_run
    per_class: dict[str, float | None]  # top-1 per class over every run; None where the test set has none
    gain: dict[str, Any] | None  # over real only (stats.paired_interval); None for real only
    aug_settings: dict[str, Any] | None  # what treated its augmentation samples differently; None for real only
    cost: dict[str, Any]


@dataclass(frozen=True)
class EvaluationReport:
    classes: list[str]
    arms: list[ArmResult]
    config: dict[str, Any]
    protocol: dict[str, Any]  # the classifier's recipe in words and numbers, and what each draw chose
    draws: list[dict[str, Any]]  # per draw: real images per class
    comparisons: list[dict[str, Any]]  # paired differences asked for with ``compare``
    counts: dict[str, dict[str, int]]  # "train" (first draw) / "test" -> class -> images
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


def _pct(v: float | None, spec: str = ".1f") -> str:
    return "–" if v is None else format(100 * v, spec)


def _interval(g: dict[str, Any] | None) -> str:
    if g is None:
        return "–"
    return f"{100 * g['mean']:+.1f} [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]"


def _num(v: float | None) -> str:
    return "–" if v is None else format(v, ".3g")


def table_rows(report: EvaluationReport) -> list[list[str]]:
    rows = []
    for a in report.arms:
        g, c = a.gain, a.cost
        positive = f"{g['positive_draws']}/{g['num_draws']}" if g else "–"
        rows.append([a.name, _num(a.num_images), f"{_pct(a.accuracy['mean'])} ± {_pct(a.accuracy['std'])}",
                     _interval(g), positive, _num(c.get("seconds_per_image")),
                     _num(c.get("index_build_seconds_per_image"))])
    return rows


def markdown(report: EvaluationReport) -> str:
    conf = report.config.get("confidence", 0.95)
    head = ["arm", "aug images / draw", "top-1 % (mean ± std over draws)", f"gain pts [{conf:.0%} CI]",
            "draws gaining", "s / image", "+ index build s / image"]
    lines = [report.protocol["text"], "", "| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    if report.comparisons:
        lines += ["", f"Paired differences [{conf:.0%} CI]:", ""]
        lines += [f"- {c['a']} − {c['b']}: {_interval(c)} pts" for c in report.comparisons]
    aug = [f"- {a.name}: " + ", ".join(f"{k} {v}" for k, v in a.aug_settings.items())
           for a in report.arms if a.aug_settings and any(v not in (None, 0, 0.0) for v in a.aug_settings.values())]
    if aug:
        lines += ["", "Applied to augmentation samples only:", ""] + aug
    lines += ["", _leak_text(report.leakage), "", "Per-class top-1 % (every run):", "",
              "| class | " + " | ".join(a.name for a in report.arms) + " |", "| --- |" + " --- |" * len(report.arms)]
    lines += [f"| {c} | " + " | ".join(_pct(a.per_class.get(c)) for a in report.arms) + " |" for c in report.classes]
    if report.warnings:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in report.warnings]
    return "\n".join(lines) + "\n"


def _leak_text(leakage: dict[str, Any]) -> str:
    if not leakage.get("enabled"):
        return "Copy check: off."
    excluded = len(leakage["excluded_test_images"]) + sum(map(len, leakage["excluded_augmentation_images"].values()))
    return (f"Copy check ({leakage['method']}; near-copy residual <= {leakage['near_copy_residual']}, "
            f"{leakage['candidates_per_image']} candidates per image; policy {leakage['policy']}): "
            f"{leakage['found']} pair(s) found" + (f", {excluded} image(s) excluded" if excluded else "") + ".")


def chart_png(report: EvaluationReport) -> bytes:
    """Accuracy from 0 (left), gain over real only with its interval (middle), cost per image (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(max(12, 1.6 * len(report.arms) + 8), 4.2))
    _accuracy_axis(ax1, report)
    _gain_axis(ax2, report)
    _cost_axis(ax3, report)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _accuracy_axis(ax, report: EvaluationReport) -> None:
    names = [a.name for a in report.arms]
    ax.bar(range(len(names)), [100 * a.accuracy["mean"] for a in report.arms],
           yerr=[100 * a.accuracy["std"] for a in report.arms], capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("top-1 accuracy (%)")
    over = f"{len(report.draws)} draws" if len(report.draws) > 1 else "seeds, one draw"
    ax.set_title(f"accuracy (mean ± std over {over})")


def _gain_axis(ax, report: EvaluationReport) -> None:
    arms = [a for a in report.arms if a.gain]
    conf = report.config.get("confidence", 0.95)
    for i, a in enumerate(arms):
        g = a.gain
        ax.errorbar(100 * g["mean"], i, xerr=[[100 * (g["mean"] - g["ci_low"])], [100 * (g["ci_high"] - g["mean"])]],
                    fmt="o", color="#c44e52" if g["ci_high"] < 0 else "#55a868" if g["ci_low"] > 0 else "#8c8c8c",
                    capsize=4)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(arms)), [a.name for a in arms])
    ax.invert_yaxis()
    ax.set_xlabel(f"gain over real only (points), {conf:.0%} CI")
    ax.set_title("gain, interval over draws, seeds and test items")


def _cost_axis(ax, report: EvaluationReport) -> None:
    arms = [a for a in report.arms if a.cost.get("seconds_per_image") is not None]
    if not arms:
        ax.text(0.5, 0.5, "no cost recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    own = [a.cost["seconds_per_image"] for a in arms]
    build = [a.cost.get("index_build_seconds_per_image") or 0.0 for a in arms]
    ax.bar(range(len(arms)), own, color="#dd8452", label="making the images")
    ax.bar(range(len(arms)), build, bottom=own, color="#937860", label="index build, amortised per image")
    ax.set_xticks(range(len(arms)), [a.name for a in arms], rotation=30, ha="right")
    ax.set_ylabel("wall seconds per augmentation image")
    ax.set_title("cost per image (device in report.json)")
    ax.legend(fontsize=8)
