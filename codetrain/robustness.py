"""Robustness sweep: accuracy and AUC of fitted classifiers on test images under JPEG, downscaling, blur and cropping."""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter
from torch import nn

from codetrain.classifiers import FittedClassifier
from codetrain.embed import embed_shards_cached, model_fingerprint
from codetrain.metrics import evaluate_predictions
from codetrain.realsource import RealImageSource

log = logging.getLogger(__name__)

DEFAULT_LEVELS: dict[str, tuple[float, ...]] = {
    "jpeg": (95, 75, 50, 30),
    "downscale": (0.75, 0.5, 0.25),
    "blur": (0.5, 1.0, 2.0),
    "crop": (0.9, 0.7, 0.5),
}
"""Per family, the levels swept: JPEG quality, downscale factor, Gaussian blur sigma (px), kept crop fraction."""

UNITS = {"jpeg": "quality", "downscale": "factor", "blur": "sigma (px)", "crop": "kept fraction"}
"""What a level means, per family (axis labels of the plot)."""


def _jpeg(img: Image.Image, quality: float) -> Image.Image:
    """Re-encode as JPEG at `quality` (1-100) and decode again."""
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, "JPEG", quality=round(quality))
    buffer.seek(0)
    with Image.open(buffer) as out:
        return out.convert("RGB")


def _downscale(img: Image.Image, factor: float) -> Image.Image:
    """Shrink both sides by `factor` (antialiased bicubic), at least 1 px."""
    size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
    return img.resize(size, Image.Resampling.BICUBIC)


def _blur(img: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur with standard deviation `sigma` pixels."""
    return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def _crop(img: Image.Image, fraction: float) -> Image.Image:
    """Centre crop keeping `fraction` of the width and of the height (at least 1 px)."""
    w, h = max(1, round(img.width * fraction)), max(1, round(img.height * fraction))
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return img.crop((left, top, left + w, top + h))


PERTURBATIONS = {"jpeg": _jpeg, "downscale": _downscale, "blur": _blur, "crop": _crop}
_VALID = {
    "jpeg": (lambda v: 1 <= v <= 100, "a quality in 1..100"),
    "downscale": (lambda v: 0 < v <= 1, "a factor in (0, 1]"),
    "blur": (lambda v: v >= 0, "a sigma >= 0"),
    "crop": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
}


def perturb(img: Image.Image, family: str, level: float) -> Image.Image:
    """Apply one perturbation family at `level` to an RGB image."""
    return PERTURBATIONS[family](img, level)


def validate_levels(levels: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, ...]]:
    """Check family names and level ranges; returns the levels as float tuples."""
    out = {}
    for family, values in levels.items():
        if family not in PERTURBATIONS:
            raise ValueError(f"unknown robustness family {family!r}; choose from {sorted(PERTURBATIONS)}")
        check, wanted = _VALID[family]
        for value in values:
            if not check(float(value)):
                raise ValueError(f"robustness level {value} of {family!r} must be {wanted}")
        out[family] = tuple(float(v) for v in values)
    return out


def robustness_sweep(
    model: nn.Module,
    shards: Sequence[str],
    classifiers: Mapping[str, FittedClassifier],
    levels: Mapping[str, Sequence[float]] = DEFAULT_LEVELS,
    *,
    detector: str = "CoDE",
    split: str = "test",
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    real_source: RealImageSource | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Embed the shards' images under each (family, level) and score every classifier.

    The perturbation is applied to the decoded RGB image before the model's preprocessing. One
    row per (classifier, family, level) with accuracies (real, fake, overall,
    balanced), AUC and AP.
    """
    levels = validate_levels(levels)
    fingerprint = model_fingerprint(model)
    rows: list[dict[str, Any]] = []
    for family, values in levels.items():
        for level in values:
            key = f"{family}={level:g}"
            cache = Path(cache_dir) / f"{split}.{key}.safetensors" if cache_dir is not None else None
            emb = embed_shards_cached(
                model, shards, cache, op=partial(perturb, family=family, level=level), op_key=key,
                batch_size=batch_size, real_source=real_source, desc=f"{split} {key}", fingerprint=fingerprint,
                progress=progress,
            )
            if not len(emb):
                log.warning("robustness %s: no readable image in %s", key, split)
                continue
            for name, clf in classifiers.items():
                scores = clf.score(emb.vectors)
                metrics = evaluate_predictions(emb.labels, (scores > clf.threshold).astype(int), scores, emb.generators)
                metrics.pop("per_generator")
                rows.append({"detector": detector, "classifier": name, "split": split, "family": family, "level": level, **metrics})
    return rows
