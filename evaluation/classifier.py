"""The downstream classifiers: a linear probe on frozen features, and a small CNN on pixels.

Both train on real images plus, optionally, augmentation images mixed as DA-Fusion does: with
``ratio`` = p, each sample of a batch is an augmentation image with probability p (else a real one), so
the share of synthetic samples does not depend on how many were generated. ``ratio=None`` draws
uniformly from the union. Augmentation samples may get label smoothing (their labels are less certain).
"""

from __future__ import annotations

import numpy as np

from .config import CLASSIFIERS, TrainSettings
from .errors import InvalidEvaluationError


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


def train_and_predict(kind: str, *, x_real: np.ndarray, y_real: np.ndarray, x_aug: np.ndarray, y_aug: np.ndarray,
                      x_test: np.ndarray, num_classes: int, settings: TrainSettings, seed: int) -> np.ndarray:
    """Train classifier ``kind`` on real (+ augmentation) samples and return predicted classes for ``x_test``.

    Features (linear) are standardised with the real images' statistics; pixels (cnn) are (n, 3, H, W) in
    [0, 1]. No augmentation: ``x_aug``/``y_aug`` empty. Deterministic for a given seed.
    """
    import torch

    if kind not in CLASSIFIERS:
        raise InvalidEvaluationError(f"classifier must be one of {', '.join(CLASSIFIERS)}, got {kind!r}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if kind == "linear":
        shift, scale = x_real.mean(0), x_real.std(0) + 1e-3
        model = torch.nn.Linear(x_real.shape[1], num_classes)
        lr = settings.learning_rate or 1e-2
    else:
        shift, scale = x_real.mean(axis=(0, 2, 3), keepdims=True), 0.25
        model = _cnn(torch, num_classes)
        lr = settings.learning_rate or 2e-3

    def norm(x: np.ndarray):
        return torch.from_numpy(((x - shift) / scale).astype(np.float32))

    xr, xa = norm(x_real), norm(x_aug) if len(x_aug) else None
    tr = _targets(torch, y_real, num_classes, 0.0)
    ta = _targets(torch, y_aug, num_classes, settings.aug_label_smoothing) if len(x_aug) else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.num_steps)
    model.train()
    for ir, ia in _batches(len(xr), len(x_aug), settings, rng):
        xb, tb = xr[ir], tr[ir]
        if len(ia):
            xb, tb = torch.cat([xb, xa[ia]]), torch.cat([tb, ta[ia]])
        if kind == "cnn":  # random horizontal flips: the usual minimum for a small CNN
            flip = torch.rand(len(xb)) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        loss = torch.sum(-tb * torch.log_softmax(model(xb), dim=1), dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    xt = norm(x_test)
    with torch.no_grad():
        return torch.cat([model(xt[i : i + 512]).argmax(1) for i in range(0, len(xt), 512)]).numpy()
