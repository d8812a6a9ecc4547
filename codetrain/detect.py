"""Detect generated images among user files with a trained run (or an exported bundle).

Preprocessing (identical, bit for bit, to `codetrain evaluate` and to training's clean
views: one function, `codetrain.views.decode_rgb` then `eval_transform`): each file is
decoded with Pillow at full size (any format it reads; the first frame of animated or
multi-page files), converted to RGB (transparency composited over white, greyscale and
palette expanded), its shorter side resized to 248 px and a 224x224 centre crop taken
in one antialiased bilinear resample (small images, e.g. 17x23, are upscaled the same
way), then normalised with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229,
0.224, 0.225). The embedder maps the crop to a unit vector and the chosen classifier
(fitted by `codetrain evaluate`) scores it: score > threshold (0) means "fake".
Pillow's decompression-bomb guard stays on: oversized files are reported as unreadable.
"""

from __future__ import annotations

import argparse
import csv
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from codetrain.classifiers import FittedClassifier
from codetrain.embed import embed_files, image_extensions, model_fingerprint
from codetrain.evaluate import CLASSIFIERS_DIR, MODEL_FILE, load_fitted_classifiers
from codetrain.model import CoDEEmbedder, load_embedder

log = logging.getLogger(__name__)

CSV_COLUMNS = ("path", "score", "label", "classifier")
"""Columns of the detections CSV."""


@dataclass(frozen=True)
class Detection:
    """One scored image: path, classifier score (higher = more fake), label real/fake, classifier."""

    path: str
    score: float
    label: str
    classifier: str


@dataclass
class DetectResult:
    """Detections, unreadable files with reasons, and where the CSV went."""

    classifier: str
    detections: list[Detection] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    csv_path: Path | None = None

    def counts(self) -> dict[str, int]:
        """How many images were called real, fake, and how many files were unreadable."""
        labels = Counter(d.label for d in self.detections)
        return {"real": labels["real"], "fake": labels["fake"], "unreadable": len(self.unreadable)}

    def summary(self) -> str:
        """A printable summary: counts, then each unreadable file with its reason."""
        c = self.counts()
        head = f"{len(self.detections)} images scored with {self.classifier}: {c['real']} real, {c['fake']} fake"
        lines = [f"{head}; {c['unreadable']} unreadable"]
        lines += [f"  unreadable: {path}: {reason}" for path, reason in self.unreadable]
        if self.csv_path is not None:
            lines.append(f"detections written to {self.csv_path}")
        return "\n".join(lines)


def find_images(paths: Iterable[str | Path], missing: list[tuple[Path, str]]) -> list[Path]:
    """Files named directly, plus files with an image extension under named folders (recursive), sorted.

    Paths that do not exist are appended to `missing` with the reason.
    """
    extensions = image_extensions()
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        elif path.is_file():
            found.append(path)
        else:
            missing.append((path, "no such file or folder"))
    return list(dict.fromkeys(found))


def load_detector(run_or_bundle: str | Path, classifier: str = "linear") -> tuple[CoDEEmbedder, FittedClassifier]:
    """The embedder and one fitted classifier of a run (RUN/eval/classifiers) or a bundle (BUNDLE/classifiers)."""
    root = Path(run_or_bundle)
    model = load_embedder(root / MODEL_FILE)
    for folder in (root / CLASSIFIERS_DIR, root / "eval" / CLASSIFIERS_DIR):
        if folder.is_dir():
            return model, load_fitted_classifiers(folder, [classifier], model_fingerprint(model))[classifier]
    raise FileNotFoundError(
        f"no fitted classifiers in {root / 'eval' / CLASSIFIERS_DIR} or {root / CLASSIFIERS_DIR}: "
        f"run `codetrain evaluate --run {root} --data D3DIR` first (or use an exported bundle)"
    )


def _rows(result: DetectResult, batches: Iterator[tuple[list[Path], np.ndarray]], clf: FittedClassifier) -> Iterator[Detection]:
    """Score each batch of embeddings and yield its detections."""
    for paths, emb in batches:
        for path, score in zip(paths, clf.score(emb), strict=True):
            yield Detection(str(path), float(score), "fake" if score > clf.threshold else "real", result.classifier)


def detect(
    run_or_bundle: str | Path,
    paths: Sequence[str | Path],
    classifier: str = "linear",
    batch_size: int = 32,
    out_csv: str | Path | None = None,
    device: str | None = None,
) -> DetectResult:
    """Score image files and folders (recursive) as real or fake; unreadable files are listed, not fatal.

    Rows are appended to `out_csv` (path, score, label, classifier) batch by batch, so
    an interrupted run keeps what it scored. See the module docstring for the
    preprocessing.
    """
    model, clf = load_detector(run_or_bundle, classifier)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = DetectResult(classifier)
    missing: list[tuple[Path, str]] = []
    files = find_images(paths, missing)
    failures: list[tuple[Path, str]] = []
    progress = tqdm(files, desc="detect", unit="img", leave=False)
    detections = _rows(result, embed_files(model, progress, failures, batch_size), clf)
    if out_csv is not None:
        result.csv_path = Path(out_csv)
        result.csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(result.csv_path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            for det in detections:
                writer.writerow([det.path, f"{det.score:.6g}", det.label, det.classifier])
                result.detections.append(det)
    else:
        result.detections.extend(detections)
    result.unreadable = [(str(p), reason) for p, reason in missing + failures]
    for path, reason in result.unreadable:
        log.warning("unreadable: %s: %s", path, reason)
    return result


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `codetrain detect`."""
    parser = subparsers.add_parser(
        "detect",
        help="score images or folders as real/fake with a run's or a bundle's classifier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run", required=True, type=Path, help="run folder (after evaluate) or exported bundle")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders (recursive)")
    parser.add_argument("--classifier", default="linear", help="fitted classifier to use (linear, knn, ocsvm)")
    parser.add_argument("--out", type=Path, default=Path("detections.csv"), help="CSV output (default detections.csv)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", help="torch device (default cuda when available)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    """Run `codetrain detect`, print the summary; exit 1 when no image could be read."""
    result = detect(args.run, args.paths, args.classifier, args.batch_size, args.out, args.device)
    print(result.summary())
    return 0 if result.detections else 1
