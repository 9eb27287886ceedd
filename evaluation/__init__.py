"""retrogen evaluation: does an augmentation set help a downstream classifier, and at what cost?

``evaluate(train_dir, test_dir, {name: dir}, config=EvaluationConfig(...), out_dir=...)`` trains a linear
probe (or a small CNN) on real-only and on real + each set over several seeds and returns an
``EvaluationReport`` (top-1 mean ± std, per-class accuracy, gain with a paired bootstrap CI, cost per image),
after refusing sets that leak test images. Heavy libraries load on first use.
"""

from retrogen.lazy import lazy_exports, require_namespace

require_namespace(__name__, "retrogen.evaluation")


_EXPORTS = {
    "evaluate": ".api",
    "EvaluationConfig": ".config",
    "DEFAULT_EMBEDDER": ".config",
    "REAL_ONLY": ".inputs",
    "EvaluationReport": ".report",
    "ArmResult": ".report",
    "FeatureCache": ".features",
    "EvaluationError": ".errors",
    "InvalidEvaluationError": ".errors",
    "LeakageError": ".errors",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
