"""The Python API of a trained detector: `Detector.from_pretrained(path_or_repo).predict(images)`.

`path_or_repo` is a run folder (after `codetrain evaluate`), a bundle or hub folder
(`codetrain export` / `codetrain publish`), or a hub repo id (downloaded into the hub
cache: weights, config and classifiers only). Images are PIL images or paths, any size
and any format Pillow reads, with the embedder's own preprocessing, as in evaluation and
`codetrain detect` (see `codetrain.preprocessing`), embedded in batches and scored by one
fitted classifier. (`codetrain.detect.LoadedDetector` is the plain (embedder, classifier) pair this
class wraps.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from codetrain.classifiers import FittedClassifier
from codetrain.detect import load_detector
from codetrain.embed import embed_batches, open_image_file, prepare, prepare_parallel
from codetrain.errors import InvalidInputError
from codetrain.model import CoDEEmbedder
from codetrain.runlayout import BundleFiles
from d3builder.storage.hub import local_folder

ImageInput = Union[Image.Image, str, Path]
"""One image: a PIL image, or the path of an image file."""

HUB_FILES = [BundleFiles.MODEL, BundleFiles.CONFIG, f"{BundleFiles.CLASSIFIERS}/*"]
"""What `from_pretrained` downloads from a hub repo (not the ONNX file)."""


@dataclass(frozen=True)
class Prediction:
    """The verdict on one image: classifier score (higher = more fake), label real/fake, classifier used."""

    score: float
    label: str
    classifier: str


class Detector:
    """A CoDE embedder and one of its fitted classifiers (linear, knn or ocsvm)."""

    def __init__(self, embedder: CoDEEmbedder, classifier: FittedClassifier) -> None:
        """Wrap a loaded embedder and classifier (see `from_pretrained`)."""
        self.embedder = embedder.eval()
        self.classifier = classifier

    @classmethod
    def from_pretrained(
        cls, path_or_repo: str | Path, classifier: str = "linear", device: str | None = None, **download: Any
    ) -> Detector:
        """Load a run, a bundle or a hub repo id; `download` goes to huggingface_hub.snapshot_download (revision, ...)."""
        root = local_folder(path_or_repo, allow_patterns=HUB_FILES, **download)
        embedder, fitted = load_detector(root, classifier)
        embedder.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(embedder, fitted)

    def embed(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 32) -> np.ndarray:
        """L2-normalised embeddings (n, d), in input order; InvalidInputError (a ValueError) naming every unreadable image."""
        items = [images] if isinstance(images, (Image.Image, str, Path)) else list(images)
        failures: list[str] = []

        def load(item: tuple[int, ImageInput]) -> torch.Tensor:
            image = item[1]
            return prepare(image if isinstance(image, Image.Image) else open_image_file(image),
                           preprocessing=self.embedder.preprocessing)

        def failed(item: tuple[int, ImageInput], exc: Exception) -> None:
            failures.append(f"image {item[0]} ({item[1]}): {type(exc).__name__}: {exc}")

        prepared = prepare_parallel(enumerate(items), load, failed, 2 * batch_size)
        chunks = [emb for _, emb in embed_batches(self.embedder, prepared, batch_size)]
        if failures:
            raise InvalidInputError(f"{len(failures)} unreadable image(s): " + "; ".join(failures))
        return np.concatenate(chunks) if chunks else np.zeros((0, self.embedder.embed_dim), np.float32)

    def predict(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 32) -> list[Prediction]:
        """One Prediction per image, in input order (score > the classifier's threshold means fake)."""
        embeddings = self.embed(images, batch_size)
        if not len(embeddings):
            return []
        name, threshold = self.classifier.name, self.classifier.threshold
        return [Prediction(float(s), "fake" if s > threshold else "real", name) for s in self.classifier.score(embeddings)]


__all__ = ["Detector", "Prediction", "ImageInput"]
