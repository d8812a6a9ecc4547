"""Save and load fitted classifiers as skops archives, never unpickling anything.

A file is audited before any object is built: its schema must name only the node
loaders and types on an explicit allow-list, skops itself must agree, and the loaded
payload must have exactly the expected shape and estimator types.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

import skops.io as sio
from skops.io.exceptions import UntrustedTypesFoundException

from codetrain.classifiers import CLASSIFIERS, FittedClassifier
from codetrain.errors import UserError, read_input
from d3builder.storage.store import atomic_write_bytes, is_url

FORMAT = "codetrain.classifier"
VERSION = 1

# Node loaders that only rebuild containers, JSON values, arrays and allowed classes:
# no function, method, reduce or operator nodes.
ALLOWED_LOADERS = frozenset(
    {"DictNode", "ListNode", "TupleNode", "JsonNode", "TypeNode", "NdArrayNode", "ObjectNode"}
)
# Exactly the types our three classifiers put in an archive (skops stores every JSON
# value as builtins.str), and nothing else.
ALLOWED_TYPES = frozenset(
    {
        "sklearn.linear_model._logistic.LogisticRegression",
        "sklearn.neighbors._unsupervised.NearestNeighbors",
        "sklearn.svm._classes.OneClassSVM",
        "numpy.ndarray",
        "builtins.dict",
        "builtins.list",
        "builtins.tuple",
        "builtins.str",
    }
)


class UntrustedFileError(UserError, ValueError):
    """A classifier file that is foreign, corrupt or holds types outside the allow-list."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"refusing to load classifier file {str(path)!r}: {reason}")
        self.path = path if isinstance(path, Path) or is_url(path) else Path(path)


def _type_name(obj: Any) -> str:
    """Fully qualified name of an object's type, e.g. 'numpy.ndarray'."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def classifier_bytes(clf: FittedClassifier) -> bytes:
    """`clf` as a skops archive."""
    return sio.dumps({"format": FORMAT, "version": VERSION, "name": clf.name, "estimators": clf.estimators()})


def save_classifier(clf: FittedClassifier, path: str | Path) -> Path:
    """Write `clf` to a local `path` as a skops archive (atomically) and return the path."""
    return atomic_write_bytes(path, classifier_bytes(clf))


def _schema_nodes(node: Any) -> Iterator[dict[str, Any]]:
    """Yield every node (a dict naming a __loader__) in a skops schema."""
    if isinstance(node, dict):
        if "__loader__" in node:
            yield node
        for value in node.values():
            yield from _schema_nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _schema_nodes(value)


def _audit_schema(path: str | Path, data: bytes) -> None:
    """Raise UntrustedFileError unless the archive's schema uses only allowed loaders/types."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            schema = json.loads(archive.read("schema.json"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UntrustedFileError(path, f"not a skops archive ({err})") from err
    foreign: set[str] = set()
    for node in _schema_nodes(schema):
        loader = node.get("__loader__")
        name = f"{node.get('__module__')}.{node.get('__class__')}"
        if loader not in ALLOWED_LOADERS:
            foreign.add(f"{name} (loader {loader})")
        elif name not in ALLOWED_TYPES:
            foreign.add(name)
    if foreign:
        raise UntrustedFileError(path, f"types outside the allow-list: {sorted(foreign)}")


def _classifier_from_payload(path: str | Path, payload: Any) -> FittedClassifier:
    """Check the loaded payload's shape and estimator types, then build the classifier."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UntrustedFileError(path, f"not a {FORMAT} file")
    if payload.get("version") != VERSION:
        raise UntrustedFileError(path, f"unsupported version {payload.get('version')!r}")
    name = payload.get("name")
    cls = CLASSIFIERS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UntrustedFileError(path, f"unknown classifier {payload.get('name')!r}")
    estimators = payload.get("estimators")
    hints = get_type_hints(cls)
    expected = {f.name: hints[f.name] for f in fields(cls)}
    if not isinstance(estimators, dict) or set(estimators) != set(expected):
        raise UntrustedFileError(path, f"estimators must be exactly {sorted(expected)}")
    for field, value in estimators.items():
        if type(value) is not expected[field]:
            raise UntrustedFileError(path, f"estimator {field!r} is a {_type_name(value)}")
    return cls(**estimators)


def load_classifier(path: str | Path, storage_options: dict[str, Any] | None = None) -> FittedClassifier:
    """Load a classifier written by save_classifier (local path or URL), refusing anything outside the allow-list."""
    if not is_url(path):
        path = Path(path)
    data = read_input(path, storage_options)
    _audit_schema(path, data)
    try:
        untrusted = set(sio.get_untrusted_types(data=data))
        if not untrusted <= ALLOWED_TYPES:
            raise UntrustedFileError(path, f"untrusted types {sorted(untrusted - ALLOWED_TYPES)}")
        payload = sio.loads(data, trusted=sorted(ALLOWED_TYPES))
    except UntrustedFileError:
        raise
    except UntrustedTypesFoundException as err:
        raise UntrustedFileError(path, f"untrusted content ({err})") from err
    except Exception as err:  # any decoding failure of allowed types means a corrupt file
        raise UntrustedFileError(path, f"corrupt content ({type(err).__name__}: {err})") from err
    return _classifier_from_payload(path, payload)
