"""Tests for pickle-free classifier persistence: round trips and refused files."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from sklearn.linear_model import LogisticRegression

from codetrain.classifiers import CLASSIFIERS, FittedClassifier, fit_classifier
from codetrain.persistence import (
    FORMAT,
    VERSION,
    UntrustedFileError,
    load_classifier,
    save_classifier,
)

DIM = 192


class Evil:
    """A foreign class whose restoration leaves a sentinel file behind."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __setstate__(self, state: dict) -> None:
        Path(state["sentinel"]).touch()


class PickleBomb:
    """Unpickling this creates the sentinel file (what a malicious pickle would do)."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple:
        return (open, (self.sentinel, "w"))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train embeddings, labels and test embeddings: clustered reals, scattered fakes."""
    rng = np.random.default_rng(0)
    centre = rng.normal(size=DIM)
    noise = rng.normal(scale=DIM**-0.5, size=(240, DIM))
    X = noise + np.repeat([[3.0], [0.5]], 120, axis=0) * centre / np.linalg.norm(centre)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    y = np.repeat([0, 1], 60)
    return np.vstack([X[:60], X[120:180]]), y, np.vstack([X[60:120], X[180:]])


@pytest.fixture(scope="module")
def fitted(data) -> dict[str, FittedClassifier]:
    """One fitted classifier of each kind."""
    X, y, _ = data
    return {name: fit_classifier(name, X, y) for name in CLASSIFIERS}


def _rewrite_schema(src: Path, dst: Path, edit) -> None:
    """Copy a skops archive, applying `edit` to its parsed schema.json."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.namelist():
            blob = zin.read(item)
            if item == "schema.json":
                schema = json.loads(blob)
                edit(schema)
                blob = json.dumps(schema).encode()
            zout.writestr(item, blob)


def _refused(path: Path, match: str) -> UntrustedFileError:
    """Assert that loading `path` raises UntrustedFileError naming it and `match`."""
    with pytest.raises(UntrustedFileError, match=match) as info:
        load_classifier(path)
    assert str(path) in str(info.value) and info.value.path == path
    assert isinstance(info.value, ValueError)
    return info.value


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_round_trip_is_exact(name: str, fitted, data, tmp_path: Path) -> None:
    clf = fitted[name]
    _, _, X_te = data
    path = save_classifier(clf, tmp_path / f"{name}.skops")
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load_classifier(path)
    assert type(loaded) is type(clf) and loaded.name == name
    assert loaded.threshold == clf.threshold
    np.testing.assert_array_equal(loaded.score(X_te), clf.score(X_te))
    np.testing.assert_array_equal(loaded.predict(X_te), clf.predict(X_te))
    assert 0 < clf.predict(X_te).sum() < len(X_te)  # a round trip of a real decision


def test_saved_file_needs_no_trust_beyond_skops_defaults(fitted, tmp_path: Path) -> None:
    path = save_classifier(fitted["linear"], tmp_path / "c.skops")
    assert sio.get_untrusted_types(file=path) == []


def test_custom_class_in_skops_file_is_refused_and_not_run(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    payload = {"format": FORMAT, "version": VERSION, "name": "linear",
               "estimators": {"model": Evil(str(sentinel))}}
    path = tmp_path / "evil.skops"
    sio.dump(payload, path)
    _refused(path, "Evil")
    assert not sentinel.exists()
    # control: trusting the type really runs the payload
    sio.load(path, trusted=sio.get_untrusted_types(file=path))
    assert sentinel.exists()


def test_archive_edited_to_hold_os_system_is_refused(fitted, tmp_path: Path) -> None:
    good = save_classifier(fitted["linear"], tmp_path / "good.skops")
    bad = tmp_path / "bad.skops"

    def to_os_system(schema: dict) -> None:
        schema["content"]["estimators"]["content"]["model"] = {
            "__class__": "system", "__module__": "os", "__loader__": "TypeNode",
            "__id__": 1,
        }

    _rewrite_schema(good, bad, to_os_system)
    _refused(bad, "os.system")


def test_archive_edited_to_another_sklearn_type_is_refused(fitted, tmp_path: Path) -> None:
    # skops trusts every sklearn estimator by default; our allow-list does not.
    good = save_classifier(fitted["linear"], tmp_path / "good.skops")
    bad = tmp_path / "bad.skops"

    def to_cv(schema: dict) -> None:
        schema["content"]["estimators"]["content"]["model"]["__class__"] = (
            "LogisticRegressionCV"
        )

    _rewrite_schema(good, bad, to_cv)
    _refused(bad, "LogisticRegressionCV")


def test_archive_with_a_reduce_loader_is_refused(fitted, tmp_path: Path) -> None:
    good = save_classifier(fitted["linear"], tmp_path / "good.skops")
    bad = tmp_path / "bad.skops"

    def to_reduce(schema: dict) -> None:
        schema["content"]["estimators"]["content"]["model"]["__loader__"] = "ReduceNode"

    _rewrite_schema(good, bad, to_reduce)
    _refused(bad, "loader ReduceNode")


def test_allowed_types_in_the_wrong_shape_are_refused(data, tmp_path: Path) -> None:
    X, y, _ = data
    lr = LogisticRegression().fit(X, y)
    cases = {
        "wrong_estimator": ({"format": FORMAT, "version": VERSION, "name": "ocsvm",
                             "estimators": {"model": lr}}, "is a sklearn"),
        "wrong_fields": ({"format": FORMAT, "version": VERSION, "name": "knn",
                          "estimators": {"model": lr}}, "must be exactly"),
        "unknown_name": ({"format": FORMAT, "version": VERSION, "name": "svm",
                          "estimators": {}}, "unknown classifier"),
        "future_version": ({"format": FORMAT, "version": 99, "name": "linear",
                            "estimators": {"model": lr}}, "unsupported version"),
        "foreign_format": ({"weights": [1, 2, 3]}, "not a codetrain.classifier"),
    }
    for stem, (payload, match) in cases.items():
        path = tmp_path / f"{stem}.skops"
        sio.dump(payload, path)
        _refused(path, match)


def test_random_bytes_and_zip_without_schema_are_refused(tmp_path: Path) -> None:
    noise = tmp_path / "noise.skops"
    noise.write_bytes(os.urandom(4096))
    _refused(noise, "not a skops archive")
    empty_zip = tmp_path / "empty.skops"
    with zipfile.ZipFile(empty_zip, "w") as archive:
        archive.writestr("data.npy", b"\x00")
    _refused(empty_zip, "not a skops archive")


def test_pickle_file_is_refused_and_not_run(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    path = tmp_path / "classifier.pkl"
    path.write_bytes(pickle.dumps(PickleBomb(str(sentinel))))
    _refused(path, "not a skops archive")
    assert not sentinel.exists()
    # control: unpickling the same kind of payload really creates its sentinel
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(PickleBomb(str(control)))).close()
    assert control.exists()


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "absent.skops")
