"""Detect generated images among user files with a trained run (or an exported bundle).

Preprocessing (identical, bit for bit, to `codetrain evaluate` and to training's clean views:
one decode, `codetrain.views.decode_rgb`, then the embedder's own input size and normalisation,
see `codetrain.preprocessing`): each file is decoded with Pillow at full size (any format it
reads; the first frame of animated or multi-page files), converted to RGB (transparency
composited over white, greyscale and palette expanded), its shorter side resized to
size x 248/224 and the central size x size crop taken in one antialiased bilinear resample
(small images, e.g. 17x23, are upscaled the same way), then normalised with the model's mean
and std (for the paper's ViT-Tiny: 248 -> 224 px, ImageNet mean/std). The embedder maps the
crop to a unit vector and the chosen classifier (fitted by `codetrain evaluate`) scores it:
score > threshold (0) means "fake". Pillow's decompression-bomb guard stays on: oversized files
are reported as unreadable. Every input that is not scored (missing, a broken or looping
symbolic link, unreadable) is listed with its reason, on stdout and in the CSV.
"""

from __future__ import annotations

import argparse
import csv
import enum
import errno
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from codetrain.classifiers import FittedClassifier
from codetrain.embed import embed_files, image_extensions, model_fingerprint
from codetrain.errors import MissingInputError, reports_user_errors
from codetrain.evaluate import load_fitted_classifiers
from codetrain.model import CoDEEmbedder, load_embedder
from codetrain.runlayout import CLASSIFIERS_DIR, MODEL_FILE, RunLayout
from d3builder.storage.store import Location, open_store, storage_defaults

log = logging.getLogger(__name__)

CSV_COLUMNS = ("path", "score", "label", "classifier", "reason")
"""Columns of the detections CSV: scored images first (reason empty), then every input not scored."""


class Label(str, enum.Enum):
    """A detection's verdict; UNSCORED marks CSV rows of inputs that could not be scored."""

    REAL = "real"
    FAKE = "fake"
    UNSCORED = "unscored"


class SkipReason(str, enum.Enum):
    """Why an input was not scored."""

    MISSING = "no such file or folder"
    LINK_LOOP = "symbolic link loop"
    BROKEN_LINK = "broken symbolic link"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class Detection:
    """One scored image: path, classifier score (higher = more fake), label real/fake, classifier."""

    path: str
    score: float
    label: Label
    classifier: str


@dataclass(frozen=True)
class Unscored:
    """An input that was not scored, and why (`detail`: e.g. the decoder's error)."""

    path: str
    reason: SkipReason
    detail: str = ""

    @property
    def message(self) -> str:
        """The reason as one line of text."""
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value


class LoadedDetector(NamedTuple):
    """An embedder and one fitted classifier."""

    embedder: CoDEEmbedder
    classifier: FittedClassifier


@dataclass
class DetectResult:
    """Detections, inputs not scored with reasons, and where the CSV went."""

    classifier: str
    detections: list[Detection] = field(default_factory=list)
    unscored: list[Unscored] = field(default_factory=list)
    csv_path: Location | None = None

    def counts(self) -> dict[str, int]:
        """How many images were called real, fake, and how many inputs were not scored."""
        labels = Counter(d.label for d in self.detections)
        return {"real": labels[Label.REAL], "fake": labels[Label.FAKE], "unscored": len(self.unscored)}

    def summary(self) -> str:
        """A printable summary: counts, then each input not scored with its reason."""
        c = self.counts()
        head = f"{len(self.detections)} images scored with {self.classifier}: {c['real']} real, {c['fake']} fake"
        lines = [f"{head}; {c['unscored']} not scored"]
        lines += [f"  not scored: {u.path}: {u.message}" for u in self.unscored]
        if self.csv_path is not None:
            lines.append(f"detections written to {self.csv_path}")
        return "\n".join(lines)


def _link_problem(path: Path) -> SkipReason | None:
    """Why a path cannot be followed (a looping or dangling symbolic link), or None."""
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
    except OSError as exc:
        return SkipReason.LINK_LOOP if exc.errno == errno.ELOOP else SkipReason.BROKEN_LINK
    return None


def find_images(paths: Iterable[str | Path], unscored: list[Unscored]) -> list[Path]:
    """Files named directly, plus files with an image extension under named folders (recursive), sorted.

    Symbolic links to folders are not descended. Paths that do not exist, symbolic links that
    loop or dangle (under a folder whatever their name) and unreadable folders are appended to
    `unscored` with the reason.
    """
    extensions = image_extensions()
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        problem = _link_problem(path)
        if problem is not None:
            unscored.append(Unscored(str(path), problem))
        elif path.is_dir():
            found += sorted(_scan(path, extensions, unscored))
        elif path.is_file():
            found.append(path)
        else:
            unscored.append(Unscored(str(path), SkipReason.MISSING))
    return list(dict.fromkeys(found))


def _scan(folder: Path, extensions: frozenset[str], unscored: list[Unscored]) -> Iterator[Path]:
    """The image files below a folder; links that cannot be followed and unreadable folders go to `unscored`."""

    def unreadable(exc: OSError) -> None:
        unscored.append(Unscored(str(exc.filename), SkipReason.UNREADABLE, f"{type(exc).__name__}: {exc.strerror}"))

    for top, _, names in os.walk(folder, onerror=unreadable):
        for name in sorted(names):
            path = Path(top) / name
            problem = _link_problem(path)
            if problem is not None:
                unscored.append(Unscored(str(path), problem))
            elif path.suffix.lower() in extensions and path.is_file():
                yield path


def load_detector(source: str | Path, classifier: str = "linear", storage_options: Mapping[str, Any] | None = None) -> LoadedDetector:
    """The embedder and one fitted classifier of a run (RUN/eval/classifiers) or a bundle (BUNDLE/classifiers).

    `source` may be a local folder or an fsspec URL.
    """
    root = open_store(source, storage_options, writable=False)
    model = load_embedder(root.url(root.root / MODEL_FILE), storage_options)
    run_classifiers = f"{RunLayout.EVAL}/{CLASSIFIERS_DIR}"
    for folder in (CLASSIFIERS_DIR, run_classifiers):
        if root.exists(root.root / folder):
            fitted = load_fitted_classifiers(root.child(folder), [classifier], model_fingerprint(model))
            return LoadedDetector(model, fitted[classifier])
    raise MissingInputError(
        f"no fitted classifiers in {root.url(root.root / run_classifiers)} or {root.url(root.root / CLASSIFIERS_DIR)}: "
        f"run `codetrain evaluate --run {root.url()} --data D3DIR` first (or use an exported bundle)"
    )


def _rows(batches: Iterator[tuple[list[Path], np.ndarray]], clf: FittedClassifier, name: str) -> Iterator[Detection]:
    """Score each batch of embeddings and yield its detections."""
    for paths, emb in batches:
        for path, score in zip(paths, clf.score(emb), strict=True):
            yield Detection(str(path), float(score), Label.FAKE if score > clf.threshold else Label.REAL, name)


def detect(
    source: str | Path,
    paths: Sequence[str | Path],
    classifier: str = "linear",
    batch_size: int = 32,
    out_csv: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> DetectResult:
    """Score image files and folders (recursive) as real or fake with a run or bundle (local or URL).

    Inputs that cannot be scored are listed with their reason, not fatal. Detections are
    written to `out_csv` (a local path or URL: path, score, label, classifier, reason) as
    they come, then one row per input not scored; the file appears whole, atomically, at the
    end. See the module docstring for the preprocessing.
    """
    with storage_defaults([str(source), str(out_csv) if out_csv else None], storage_options):
        model, clf = load_detector(source, classifier, storage_options)
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        result = DetectResult(classifier)
        files = find_images(paths, result.unscored)
        failures: list[tuple[Path, str]] = []
        bar = tqdm(files, desc="detect", unit="img", leave=False, disable=not progress)
        detections = _rows(embed_files(model, bar, failures, batch_size), clf, classifier)
        if out_csv is None:
            result.detections.extend(detections)
            _add_failures(result, failures)
        else:
            target = open_store(out_csv, storage_options)
            with target.atomic_writer(target.root, encoding="utf-8") as fh:
                result.csv_path = target.location()
                writer = csv.writer(fh)
                writer.writerow(CSV_COLUMNS)
                for det in detections:
                    writer.writerow([det.path, f"{det.score:.6g}", det.label.value, det.classifier, ""])
                    result.detections.append(det)
                _add_failures(result, failures)
                for item in result.unscored:
                    writer.writerow([item.path, "", Label.UNSCORED.value, classifier, item.message])
    for item in result.unscored:
        log.warning("not scored: %s: %s", item.path, item.message)
    return result


def _add_failures(result: DetectResult, failures: list[tuple[Path, str]]) -> None:
    """Add the files that failed to decode to the inputs not scored."""
    result.unscored += [Unscored(str(path), SkipReason.UNREADABLE, reason) for path, reason in failures]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `codetrain detect`."""
    parser = subparsers.add_parser(
        "detect",
        help="score images or folders as real/fake with a run's or a bundle's classifier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run folder after `codetrain evaluate` (local folder or fsspec URL)")
    source.add_argument("--bundle", help="bundle folder written by `codetrain export` (local folder or fsspec URL)")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders (recursive)")
    parser.add_argument("--classifier", default="linear", help="fitted classifier to use (linear, knn, ocsvm)")
    parser.add_argument("--csv", default="detections.csv", help="detections table written (default detections.csv)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", help="torch device (default cuda when available)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    parser.set_defaults(func=_run)


@reports_user_errors
def _run(args: argparse.Namespace) -> int:
    """Run `codetrain detect`, print the summary; exit 1 when no image could be scored."""
    result = detect(args.run or args.bundle, args.paths, args.classifier, args.batch_size, args.csv, args.device,
                    args.progress)
    print(result.summary())
    return 0 if result.detections else 1
