"""Tests for the frozen-embedding classifiers and the detection metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from codetrain.classifiers import CLASSIFIERS, fit_classifier
from codetrain.metrics import evaluate_predictions, roc_points

DIM = 192


def _unit(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows."""
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _blob(rng: np.random.Generator, centre: np.ndarray, n: int) -> np.ndarray:
    """n unit vectors scattered around `centre` (noise of norm about 1)."""
    return _unit(centre + rng.normal(scale=DIM**-0.5, size=(n, DIM)))


@pytest.fixture(scope="module")
def centre() -> np.ndarray:
    """A fixed direction of length 3 for the real cluster."""
    mu = np.random.default_rng(0).normal(size=DIM)
    return 3 * mu / np.linalg.norm(mu)


def _split(
    rng: np.random.Generator, real: np.ndarray, fake: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw n train and n test points per class around the given centres."""
    X_tr = np.vstack([_blob(rng, real, n), _blob(rng, fake, n)])
    X_te = np.vstack([_blob(rng, real, n), _blob(rng, fake, n)])
    y = np.repeat([0, 1], n)
    return X_tr, y, X_te, y


def _json_types_only(obj: object) -> bool:
    """True if obj is built only from dict/list/str/int/float/None (no numpy types)."""
    if isinstance(obj, dict):
        return all(type(k) is str and _json_types_only(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_json_types_only(v) for v in obj)
    return obj is None or type(obj) in (str, int, float)


@pytest.mark.parametrize("name", ["linear", "knn"])
def test_separable_clusters_are_perfect(name: str, centre: np.ndarray) -> None:
    X_tr, y_tr, X_te, y_te = _split(np.random.default_rng(1), centre, -centre, 200)
    clf = fit_classifier(name, X_tr, y_tr)
    pred, scores = clf.predict(X_te), clf.score(X_te)
    m = evaluate_predictions(y_te, pred, scores, ["g"] * len(y_te))
    assert clf.name == name
    assert pred.dtype.kind == "i" and scores.dtype == np.float64
    assert m["acc"] == m["acc_real"] == m["acc_fake"] == 1.0
    assert m["auc"] == m["ap"] == 1.0


def test_ocsvm_flags_opposite_cluster_and_keeps_most_reals(centre: np.ndarray) -> None:
    X_tr, y_tr, X_te, y_te = _split(np.random.default_rng(2), centre, -centre, 200)
    clf = fit_classifier("ocsvm", X_tr, y_tr)
    m = evaluate_predictions(y_te, clf.predict(X_te), clf.score(X_te), ["g"] * len(y_te))
    # nu=0.1 lets about 10% of reals fall outside the support; every fake is an outlier.
    assert m["acc_fake"] == 1.0
    assert 0.8 <= m["acc_real"] < 1.0
    assert m["auc"] == 1.0


def test_ocsvm_ignores_fakes_when_fitting(centre: np.ndarray) -> None:
    X_tr, y_tr, X_te, _ = _split(np.random.default_rng(3), centre, -centre, 50)
    with_fakes = fit_classifier("ocsvm", X_tr, y_tr)
    reals_only = fit_classifier("ocsvm", X_tr[y_tr == 0], y_tr[y_tr == 0])
    np.testing.assert_array_equal(with_fakes.score(X_te), reals_only.score(X_te))


@pytest.mark.parametrize("name", ["linear", "knn"])
def test_identical_distributions_give_chance_auc(name: str, centre: np.ndarray) -> None:
    X_tr, y_tr, X_te, y_te = _split(np.random.default_rng(4), centre, centre, 600)
    clf = fit_classifier(name, X_tr, y_tr)
    m = evaluate_predictions(y_te, clf.predict(X_te), clf.score(X_te), ["g"] * len(y_te))
    assert abs(m["auc"] - 0.5) < 0.1
    assert abs(m["acc"] - 0.5) < 0.1


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_predict_is_score_above_threshold(name: str, centre: np.ndarray) -> None:
    # reals clustered, fakes uniform on the sphere: test rows of both kinds
    X_tr, y_tr, X_te, _ = _split(np.random.default_rng(5), centre, np.zeros(DIM), 100)
    clf = fit_classifier(name, X_tr, y_tr)
    pred = clf.predict(X_te)
    np.testing.assert_array_equal(pred, (clf.score(X_te) > clf.threshold).astype(int))
    assert 0 < pred.sum() < len(pred)


def test_knn_decision_matches_sklearn_one_nn() -> None:
    origin = np.zeros(DIM)
    X_tr, y_tr, X_te, _ = _split(np.random.default_rng(6), origin, origin, 150)
    ours = fit_classifier("knn", X_tr, y_tr).predict(X_te)
    ref = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(X_tr, y_tr).predict(X_te)
    np.testing.assert_array_equal(ours, ref)
    assert 0 < ours.sum() < len(ours)


def test_float32_embeddings_are_accepted(centre: np.ndarray) -> None:
    X_tr, y_tr, X_te, y_te = _split(np.random.default_rng(7), centre, -centre, 50)
    clf = fit_classifier("linear", X_tr.astype(np.float32), y_tr.astype(bool))
    np.testing.assert_array_equal(clf.predict(X_te.astype(np.float32)), y_te)


def test_bad_inputs_raise_clear_errors(centre: np.ndarray) -> None:
    X_tr, y_tr, _, _ = _split(np.random.default_rng(8), centre, -centre, 10)
    with pytest.raises(ValueError, match="unknown classifier 'svm'"):
        fit_classifier("svm", X_tr, y_tr)
    with pytest.raises(ValueError, match="needs fake samples"):
        fit_classifier("linear", X_tr, np.zeros_like(y_tr))
    with pytest.raises(ValueError, match="needs real samples"):
        fit_classifier("ocsvm", X_tr, np.ones_like(y_tr))
    with pytest.raises(ValueError, match="labels must be 0"):
        fit_classifier("knn", X_tr, y_tr * 2)
    with pytest.raises(ValueError, match="expected 20 labels"):
        fit_classifier("knn", X_tr, y_tr[:5])
    clf = fit_classifier("knn", X_tr, y_tr)
    with pytest.raises(ValueError, match="NaN"):
        clf.score(np.full((2, DIM), np.nan))


def test_metrics_by_hand() -> None:
    y_true = [0, 0, 0, 0, 1, 1, 1, 1]
    y_pred = [0, 0, 0, 1, 1, 1, 0, 0]
    scores = [0.1, 0.2, 0.3, 0.9, 0.8, 0.7, 0.25, 0.05]
    gens = ["", "", "", "", "a", "a", "b", "b"]
    m = evaluate_predictions(y_true, y_pred, scores, gens)
    assert (m["n_real"], m["n_fake"]) == (4, 4)
    assert m["acc_real"] == 0.75 and m["acc_fake"] == 0.5 and m["acc"] == 0.625
    assert m["acc_balanced"] == 0.625
    assert set(m["per_generator"]) == {"a", "b"}
    a, b = m["per_generator"]["a"], m["per_generator"]["b"]
    assert (a["n"], a["acc"], a["acc_balanced"]) == (2, 1.0, 0.875)
    assert (b["n"], b["acc"], b["acc_balanced"]) == (2, 0.0, 0.375)
    # a's fakes (0.8, 0.7) beat 3 of 4 reals each: AUC 6/8.
    assert a["auc"] == pytest.approx(0.75)
    # b's fakes (0.25, 0.05) beat 2 and 0 reals: AUC 2/8.
    assert b["auc"] == pytest.approx(0.25)
    assert m["auc"] == pytest.approx(8 / 16)
    assert 0 < b["ap"] < a["ap"] < 1
    assert _json_types_only(m)
    json.dumps(m)


def test_metrics_undefined_values_are_none() -> None:
    m = evaluate_predictions([1, 1], [1, 0], [0.9, 0.1], ["a", "a"])
    assert m["acc_real"] is None and m["acc_balanced"] is None
    assert m["auc"] is None and m["ap"] is None
    assert m["per_generator"]["a"] == {
        "n": 2, "acc": 0.5, "acc_balanced": None, "auc": None, "ap": None
    }
    only_reals = evaluate_predictions([0, 0], [0, 0], [0.1, 0.2], ["", ""])
    assert only_reals["per_generator"] == {} and only_reals["acc_fake"] is None
    assert roc_points([0, 0], [0.1, 0.2]) is None


def test_metrics_reject_malformed_input() -> None:
    with pytest.raises(ValueError, match="equal length"):
        evaluate_predictions([0, 1], [0, 1], [0.1, 0.9], ["a"])
    with pytest.raises(ValueError, match="predictions must be 0"):
        evaluate_predictions([0, 1], [0, 0.5], [0.1, 0.9], ["a", "a"])
    with pytest.raises(ValueError, match="labels must be 0"):
        roc_points([0, 2], [0.1, 0.9])


def test_per_generator_metrics_separate_easy_from_indistinguishable(
    centre: np.ndarray,
) -> None:
    rng = np.random.default_rng(9)
    n = 300

    def draw(c: np.ndarray) -> np.ndarray:
        return _blob(rng, c, n)

    X_tr = np.vstack([draw(centre), draw(-centre), draw(centre)])
    X_te = np.vstack([draw(centre), draw(-centre), draw(centre)])
    y = np.repeat([0, 1, 1], n)
    gens = ["real"] * n + ["a"] * n + ["b"] * n
    for name in ("linear", "knn"):
        clf = fit_classifier(name, X_tr, y)
        m = evaluate_predictions(y, clf.predict(X_te), clf.score(X_te), gens)
        a, b = m["per_generator"]["a"], m["per_generator"]["b"]
        assert a["acc"] == 1.0 and a["auc"] == 1.0 and a["ap"] == 1.0, name
        assert a["acc_balanced"] == pytest.approx((m["acc_real"] + 1.0) / 2)
        assert abs(b["auc"] - 0.5) < 0.1, name
        assert b["acc_balanced"] == pytest.approx((m["acc_real"] + b["acc"]) / 2)
        assert a["n"] == b["n"] == n
        assert m["auc"] > b["auc"] + 0.2  # the easy generator lifts the pooled AUC


def test_roc_points_shape() -> None:
    y = np.repeat([0, 1], 4)
    scores = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.95, 0.99]
    pts = roc_points(y, scores)
    assert pts is not None and _json_types_only(pts)
    assert pts["fpr"][0] == pts["tpr"][0] == 0.0
    assert pts["fpr"][-1] == pts["tpr"][-1] == 1.0
    assert pts["fpr"] == sorted(pts["fpr"]) and pts["tpr"] == sorted(pts["tpr"])
    auc = evaluate_predictions(y, y, scores, [""] * 8)["auc"]
    assert np.trapezoid(pts["tpr"], pts["fpr"]) == pytest.approx(auc) == 13 / 16


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ocsvm_reaches_its_nu_fraction_of_outliers(seed: int, centre: np.ndarray) -> None:
    # At the optimum about nu = 10% of the training reals lie outside the support; a
    # solver stopped early by the tiny gamma="auto" kernel scale lands anywhere.
    reals = _blob(np.random.default_rng(seed), centre, 400)
    clf = fit_classifier("ocsvm", reals, np.zeros(len(reals), dtype=int))
    assert 0.05 <= clf.predict(reals).mean() <= 0.15
