"""retrogen evaluation: does an augmentation set help a downstream classifier, and at what cost?

``evaluate(train_dir, test_dir, {name: dir}, config=EvaluationConfig(...), out_dir=...)`` trains a stated
classifier protocol on real-only and on real + each set, over draws of the training shots and seeds, and
returns an ``EvaluationReport`` (accuracy, per-class accuracy, gain with an interval over draws, seeds and
test items, paired differences between arms, cost per image) after checking that no training or augmentation
image copies a test image. ``evaluate_draws`` takes draws whose sets were made from each draw's own shots.
Heavy libraries load on first use.
"""

from retrogen.lazy import lazy_exports, require_namespace

require_namespace(__name__, "retrogen.evaluation")


_EXPORTS = {
    "evaluate": ".api",
    "evaluate_draws": ".api",
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
