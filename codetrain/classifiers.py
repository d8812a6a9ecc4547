"""The three classifiers of the CoDE paper, fitted on frozen embeddings.

Labels are 0 = real, 1 = fake. Every classifier exposes a continuous ``score``
(higher = more fake) and ``predict(X) == score(X) > threshold``, so hard labels and
AUC/AP always come from the same decision function.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors
from sklearn.svm import OneClassSVM

REAL, FAKE = 0, 1


def _as_features(X: np.ndarray) -> np.ndarray:
    """Return X as a finite 2-D float64 array, or raise ValueError."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"expected a non-empty 2-D embedding array, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("embeddings contain NaN or infinite values")
    return X


def _as_labels(y: np.ndarray, n: int) -> np.ndarray:
    """Return y as a 1-D int array of 0/1 labels of length n, or raise ValueError."""
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"expected {n} labels, got shape {y.shape}")
    if not np.isin(y, (REAL, FAKE)).all():
        raise ValueError(f"labels must be 0 (real) or 1 (fake), got {sorted(set(y.tolist()))}")
    return y.astype(np.int64)


def _require_classes(y: np.ndarray, needed: tuple[int, ...], name: str) -> None:
    """Raise ValueError unless every label in `needed` occurs in y."""
    missing = [c for c in needed if not (y == c).any()]
    if missing:
        words = ", ".join("real" if c == REAL else "fake" for c in missing)
        raise ValueError(f"classifier {name!r} needs {words} samples to fit; none given")


class FittedClassifier(ABC):
    """A fitted classifier on embeddings: score (higher = more fake) and predict."""

    name: ClassVar[str]
    threshold: ClassVar[float] = 0.0

    @classmethod
    @abstractmethod
    def fit(cls, X: np.ndarray, y: np.ndarray) -> FittedClassifier:
        """Fit on embeddings X (n, d) with labels y (0 = real, 1 = fake)."""

    @abstractmethod
    def _score(self, X: np.ndarray) -> np.ndarray:
        """Score validated float64 embeddings (higher = more fake)."""

    def score(self, X: np.ndarray) -> np.ndarray:
        """Continuous fake score per row (higher = more fake), as float64."""
        return np.asarray(self._score(_as_features(X)), dtype=np.float64)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Hard labels per row: 1 (fake) where score > threshold, else 0 (real)."""
        return (self.score(X) > self.threshold).astype(np.int64)

    def estimators(self) -> dict[str, BaseEstimator]:
        """The fitted scikit-learn estimators this classifier is made of, by field."""
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class LinearClassifier(FittedClassifier):
    """Logistic regression (C=0.316, balanced classes); score = log-odds of fake."""

    name: ClassVar[str] = "linear"
    model: LogisticRegression

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray) -> LinearClassifier:
        """Fit a balanced logistic regression on reals and fakes."""
        X = _as_features(X)
        y = _as_labels(y, X.shape[0])
        _require_classes(y, (REAL, FAKE), cls.name)
        model = LogisticRegression(C=0.316, class_weight="balanced", max_iter=1500)
        return cls(model=model.fit(X, y))

    def _score(self, X: np.ndarray) -> np.ndarray:
        """Signed distance to the hyperplane (log-odds that the row is fake)."""
        return self.model.decision_function(X)


@dataclass(frozen=True)
class KnnClassifier(FittedClassifier):
    """1-nearest-neighbour under cosine distance.

    Score = (cosine distance to the nearest real) - (cosine distance to the nearest
    fake), so a row is called fake (score > 0) exactly when its nearest training
    neighbour is a fake: the decision of KNeighborsClassifier(n_neighbors=1,
    metric="cosine"), with a continuous margin for AUC/AP. One index per class is
    kept because that classifier exposes no per-class distances.
    """

    name: ClassVar[str] = "knn"
    real: NearestNeighbors
    fake: NearestNeighbors

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray) -> KnnClassifier:
        """Index the real and the fake embeddings separately."""
        X = _as_features(X)
        y = _as_labels(y, X.shape[0])
        _require_classes(y, (REAL, FAKE), cls.name)
        index = {
            label: NearestNeighbors(n_neighbors=1, metric="cosine").fit(X[y == label])
            for label in (REAL, FAKE)
        }
        return cls(real=index[REAL], fake=index[FAKE])

    def _score(self, X: np.ndarray) -> np.ndarray:
        """Distance to the nearest real minus distance to the nearest fake."""
        d_real = self.real.kneighbors(X, n_neighbors=1, return_distance=True)[0][:, 0]
        d_fake = self.fake.kneighbors(X, n_neighbors=1, return_distance=True)[0][:, 0]
        return d_real - d_fake


def _ocsvm_inputs(X: np.ndarray) -> np.ndarray:
    """Scale embeddings by sqrt(d) so that gamma * <x, y> is the cosine for unit rows.

    With gamma="auto" (1/d) the cubic kernel of unit vectors is below 1e-6, and libsvm's
    stopping tolerance (1e-3) halts before the optimum. The kernel is homogeneous
    (coef0 = 0), so scaling the inputs only multiplies it by a constant: the optimal
    one-class SVM, and so every decision, is unchanged; the solver just reaches it.
    """
    return X * np.sqrt(X.shape[1])


@dataclass(frozen=True)
class OcsvmClassifier(FittedClassifier):
    """One-class SVM (poly kernel, gamma "auto", nu=0.1) fitted on reals only.

    An outlier of the real distribution is called fake; score = -decision_function.
    """

    name: ClassVar[str] = "ocsvm"
    model: OneClassSVM

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray) -> OcsvmClassifier:
        """Fit the one-class SVM on the real rows of X; fake rows are ignored."""
        X = _as_features(X)
        y = _as_labels(y, X.shape[0])
        _require_classes(y, (REAL,), cls.name)
        model = OneClassSVM(kernel="poly", gamma="auto", nu=0.1)
        return cls(model=model.fit(_ocsvm_inputs(X[y == REAL])))

    def _score(self, X: np.ndarray) -> np.ndarray:
        """Negated signed distance to the real-support boundary (outlier > 0)."""
        return -self.model.decision_function(_ocsvm_inputs(X))


CLASSIFIERS: dict[str, type[FittedClassifier]] = {
    cls.name: cls for cls in (LinearClassifier, KnnClassifier, OcsvmClassifier)
}


def fit_classifier(name: str, X: np.ndarray, y: np.ndarray) -> FittedClassifier:
    """Fit the classifier registered under `name` on embeddings X with labels y."""
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; choose from {sorted(CLASSIFIERS)}")
    return CLASSIFIERS[name].fit(X, y)
