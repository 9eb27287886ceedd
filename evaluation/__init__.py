import retrogen  # noqa: F401, I001  (first: sets OMP_WAIT_POLICY before torch/faiss load)

__doc__ = """retrogen evaluation: does an augmentation set help a downstream classifier, and at what cost?

``evaluate(train_dir, test_dir, {name: dir}, config=EvaluationConfig(...), out_dir=...)`` trains a linear
probe (or a small CNN) on real-only and on real + each set over several seeds and returns an
``EvaluationReport`` (top-1 mean ± std, per-class accuracy, gain with a paired bootstrap CI, cost per image),
after refusing sets that leak test images. Heavy libraries load on first use.
"""

from retrogen.lazy import lazy_exports  # noqa: E402

_EXPORTS = {
    "evaluate": "evaluation.api",
    "EvaluationConfig": "evaluation.api",
    "REAL_ONLY": "evaluation.api",
    "EvaluationReport": "evaluation.report",
    "ArmResult": "evaluation.report",
    "FeatureCache": "evaluation.features",
    "EvaluationError": "evaluation.errors",
    "InvalidEvaluationError": "evaluation.errors",
    "LeakageError": "evaluation.errors",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
