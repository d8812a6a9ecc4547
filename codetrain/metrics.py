"""Detection metrics: accuracy on reals, fakes, overall and per generator, plus AUC/AP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

REAL, FAKE = 0, 1


def _accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float | None:
    """Fraction of matching labels, or None for an empty selection."""
    return float((y_true == y_pred).mean()) if y_true.size else None


def _mean_or_none(a: float | None, b: float | None) -> float | None:
    """Mean of two accuracies, or None when either is undefined."""
    return None if a is None or b is None else (a + b) / 2


def _ranking(y_true: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
    """AUC and average precision (fake = positive), None when only one class is present."""
    if np.unique(y_true).size < 2:
        return {"auc": None, "ap": None}
    return {
        "auc": float(roc_auc_score(y_true, scores)),
        "ap": float(average_precision_score(y_true, scores)),
    }


def _validated(
    y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return labels and scores as 1-D arrays of equal length, or raise ValueError."""
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be 1-D of equal length")
    if not np.isin(y, (REAL, FAKE)).all():
        raise ValueError("labels must be 0 (real) or 1 (fake)")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return y.astype(np.int64), s


def evaluate_predictions(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    generators: Sequence[str],
) -> dict[str, Any]:
    """Accuracies (real, fake, overall, balanced), AUC/AP, overall and per generator.

    `generators[i]` names the generator of fake row i (its value on real rows is
    ignored). Per generator, "acc" is the accuracy on that generator's fakes,
    "acc_balanced" the mean of it and the accuracy on all reals, and AUC/AP rank all
    reals against that generator's fakes. Undefined values are None; the result is
    JSON-serialisable.
    """
    y, s = _validated(y_true, scores)
    pred = np.asarray(y_pred)
    gens = np.asarray([str(g) for g in generators], dtype=object)
    if pred.shape != y.shape or gens.shape != y.shape:
        raise ValueError(
            f"y_true {y.shape}, y_pred {pred.shape} and generators {gens.shape} "
            "must have equal length"
        )
    if not np.isin(pred, (REAL, FAKE)).all():
        raise ValueError("predictions must be 0 (real) or 1 (fake)")
    pred = pred.astype(np.int64)
    real, fake = y == REAL, y == FAKE
    acc_real = _accuracy(y[real], pred[real])
    acc_fake = _accuracy(y[fake], pred[fake])
    per_generator: dict[str, dict[str, Any]] = {}
    for gen in sorted(set(gens[fake].tolist())):
        mine = fake & (gens == gen)
        acc_gen = _accuracy(y[mine], pred[mine])
        pair = real | mine
        per_generator[gen] = {
            "n": int(mine.sum()),
            "acc": acc_gen,
            "acc_balanced": _mean_or_none(acc_real, acc_gen),
            **_ranking(y[pair], s[pair]),
        }
    return {
        "n_real": int(real.sum()),
        "n_fake": int(fake.sum()),
        "acc_real": acc_real,
        "acc_fake": acc_fake,
        "acc": _accuracy(y, pred),
        "acc_balanced": _mean_or_none(acc_real, acc_fake),
        **_ranking(y, s),
        "per_generator": per_generator,
    }


def roc_points(
    y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> dict[str, list[float]] | None:
    """ROC curve as {"fpr": [...], "tpr": [...]} (fake = positive), None with one class."""
    y, s = _validated(y_true, scores)
    if np.unique(y).size < 2:
        return None
    fpr, tpr, _ = roc_curve(y, s)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
