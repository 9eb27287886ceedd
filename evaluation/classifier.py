"""The downstream classifiers, each with a stated protocol that is the same for every arm.

- ``linear``: multinomial logistic regression (L2, lbfgs) on frozen embedder features standardised with the
  real images' statistics. C is given, or chosen on the real training images alone by stratified k-fold
  cross-validation over a grid (k = min(5, images in the smallest class); with one image per class no split
  is possible and C = 1), then used for every arm of that draw. Deterministic: seeds do not change it.
- ``cnn``: a 3-block CNN on 32 px pixels trained end to end with AdamW, a cosine schedule and random flips.
- ``stagewise``: that CNN on real + augmentation, then its classifier head re-fit on the real images only
  (logistic regression on the CNN's pooled features, C chosen as above), as SWAT does against the domain gap
  of added data. Its real-only arm follows the same two stages.

Augmentation samples may be treated differently, and only when asked: ``ratio`` = p makes them p of each cnn
batch (DA-Fusion) or of the logistic regression's sample weight; ``aug_label_smoothing`` smooths their labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import TrainSettings

StepFn = Callable[[int, int], None]  # (steps done, steps in all)
FALLBACK_C = 1.0


@dataclass(frozen=True)
class Samples:
    """One training run's data: real and augmentation samples (features or pixels) with class indices."""

    x_real: np.ndarray
    y_real: np.ndarray
    x_aug: np.ndarray
    y_aug: np.ndarray
    num_classes: int


def choose_c(x: np.ndarray, y: np.ndarray, settings: TrainSettings, *, seed: int) -> dict[str, Any]:
    """The linear classifier's C for these real samples: given, or the grid value with the best cross-validated
    accuracy (the smaller C on a tie). Returns {"C", "rule", "cv_accuracy"}."""
    if settings.linear_c is not None:
        return {"C": settings.linear_c, "rule": "given", "cv_accuracy": None}
    from sklearn.model_selection import StratifiedKFold

    folds = int(min(5, np.bincount(y).min()))
    if folds < 2:
        return {"C": FALLBACK_C, "rule": "fixed: one image per class leaves nothing to cross-validate",
                "cv_accuracy": None}
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y))
    scores = {}
    num_classes = int(y.max()) + 1
    for c in sorted(settings.linear_c_grid):
        hits = [(predict_linear(Samples(x[tr], y[tr], x[:0], y[:0], num_classes), x[va], c=c, ratio=None)
                 == y[va]).mean() for tr, va in splits]
        scores[c] = float(np.mean(hits))
    best = max(scores, key=lambda c: (scores[c], -c))
    return {"C": best, "rule": f"{folds}-fold cross-validation on the real images", "cv_accuracy": scores}


def predict_linear(data: Samples, x_test: np.ndarray, *, c: float, ratio: float | None) -> np.ndarray:
    """Logistic regression on standardised features (the real images' mean and spread) -> test predictions."""
    shift, scale = data.x_real.mean(0), data.x_real.std(0) + 1e-3
    x = np.concatenate([data.x_real, data.x_aug]) if len(data.x_aug) else data.x_real
    y = np.concatenate([data.y_real, data.y_aug]) if len(data.y_aug) else data.y_real
    model = _fit_linear((x - shift) / scale, y, _weights(len(data.x_real), len(data.x_aug), ratio), c=c)
    return model.predict((x_test - shift) / scale)


def _fit_linear(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None, *, c: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=3000).fit(x, y, sample_weight=weights)


def _weights(n_real: int, n_aug: int, ratio: float | None) -> np.ndarray | None:
    """Per-sample weights giving augmentation samples ``ratio`` of the total (which stays n_real + n_aug)."""
    if ratio is None or not n_aug:
        return None
    total = n_real + n_aug
    return np.concatenate([np.full(n_real, (1 - ratio) * total / n_real), np.full(n_aug, ratio * total / n_aug)])


def predict_cnn(data: Samples, x_test: np.ndarray, *, settings: TrainSettings, seed: int, stagewise: bool,
                on_step: StepFn | None = None) -> np.ndarray:
    """Train the CNN (pixels (n, 3, H, W) in [0, 1]) and predict ``x_test``; ``stagewise`` re-fits the head on
    the real images. Deterministic for a given seed."""
    import torch

    torch.manual_seed(seed)
    model = _cnn(torch, data.num_classes)
    shift = data.x_real.mean(axis=(0, 2, 3), keepdims=True)

    def norm(x: np.ndarray):
        return torch.from_numpy(((x - shift) / 0.25).astype(np.float32))

    _train_cnn(model, norm, data, settings=settings, seed=seed, on_step=on_step)
    model.eval()
    if not stagewise:
        return _run(model, norm(x_test)).argmax(1)
    body = model[:-2]  # up to the pooled, flattened features; the head (dropout, linear) is re-fit
    real, test = _run(body, norm(data.x_real)), _run(body, norm(x_test))
    c = choose_c(real, data.y_real, settings, seed=seed)["C"]
    return predict_linear(Samples(real, data.y_real, real[:0], data.y_real[:0], data.num_classes), test,
                          c=c, ratio=None)


def _run(model, x) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.cat([model(x[i : i + 512]) for i in range(0, len(x), 512)]).numpy()


def _train_cnn(model, norm: Callable, data: Samples, *, settings: TrainSettings, seed: int,
               on_step: StepFn | None) -> None:
    import torch

    rng = np.random.default_rng(seed)
    xr, xa = norm(data.x_real), norm(data.x_aug) if len(data.x_aug) else None
    tr = _targets(torch, data.y_real, data.num_classes, 0.0)
    ta = _targets(torch, data.y_aug, data.num_classes, settings.aug_label_smoothing) if len(data.x_aug) else None
    opt = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.num_steps)
    model.train()
    for step, (ir, ia) in enumerate(_batches(len(xr), len(data.x_aug), settings, rng), start=1):
        xb, tb = xr[ir], tr[ir]
        if len(ia):
            xb, tb = torch.cat([xb, xa[ia]]), torch.cat([tb, ta[ia]])
        flip = torch.rand(len(xb)) < 0.5  # random horizontal flips: the usual minimum for a small CNN
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        loss = torch.sum(-tb * torch.log_softmax(model(xb), dim=1), dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None and (step % 25 == 0 or step == settings.num_steps):
            on_step(step, settings.num_steps)


def _batches(n_real: int, n_aug: int, s: TrainSettings, rng: np.random.Generator):
    """Yield (indices into real, indices into aug) per step."""
    for _ in range(s.num_steps):
        if n_aug == 0:
            yield rng.integers(0, n_real, s.batch_size), np.zeros(0, np.int64)
        elif s.ratio is None:
            pick = rng.integers(0, n_real + n_aug, s.batch_size)
            yield pick[pick < n_real], pick[pick >= n_real] - n_real
        else:
            is_aug = rng.random(s.batch_size) < s.ratio
            yield rng.integers(0, n_real, int((~is_aug).sum())), rng.integers(0, n_aug, int(is_aug.sum()))


def _targets(torch, y, num_classes: int, smoothing: float):
    t = torch.nn.functional.one_hot(torch.as_tensor(y, dtype=torch.long), num_classes).float()
    return t * (1.0 - smoothing) + smoothing / num_classes if smoothing else t


def _cnn(torch, num_classes: int):
    nn = torch.nn

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(128, num_classes))
