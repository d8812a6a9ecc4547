"""What a generator returns per image, and each record's seed and size: shared by every backend, no model stack."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageOps

NAN_OUTPUT = "nan_output"
MAX_ERROR_CHARS = 500
SEED_RANGE = 2**32  # seeds stay in uint32 so that every RNG (torch, numpy) accepts them


def _digest(*parts: object) -> int:
    """Stable 256-bit integer hash of the parts (never Python's salted hash())."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest(), "big")


def seed_for(record_id: str, generator_name: str, global_seed: int) -> int:
    """Seed of one (record, generator) pair, in [0, 2**32)."""
    return _digest("seed", global_seed, generator_name, record_id) % SEED_RANGE


def size_for(record_id: str, generator_name: str, global_seed: int,
             sizes: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> tuple[int, int]:
    """Output (width, height) of one (record, generator) pair, drawn uniformly from `sizes`."""
    if not sizes:
        raise ValueError("sizes must not be empty")
    width, height = sizes[_digest("size", global_seed, generator_name, record_id) % len(sizes)]
    return int(width), int(height)


@dataclass(frozen=True)
class GenerationResult:
    """One rendered image or the reason it failed.

    `image` (RGB, exactly width x height) is encoded later per the encoding mix; `data` is an image already
    encoded elsewhere (an HTTP API, a folder), kept byte for byte with its real `encoding`. `fields` holds
    per-image provenance columns (e.g. a folder index's seed) that override the generator's."""

    seed: int | None
    width: int | None
    height: int | None
    image: Image.Image | None = None
    error: str | None = None
    resized_from: tuple[int, int] | None = None  # the pipeline's native (width, height) when it differed
    stages_run: int = 1  # pipelines run for this image (base + cascade stages)
    data: bytes | None = None
    encoding: str | None = None
    pipeline: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when an image was produced."""
        return self.error is None


def fit(image: Image.Image, width: int, height: int) -> tuple[Image.Image, tuple[int, int] | None]:
    """`image` at exactly width x height (centre crop to the aspect, then LANCZOS) and its native size if it differed."""
    native = image.size
    if native == (width, height):
        return image, None
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS), native


def short_error(exc: BaseException) -> str:
    """One-line reason for a failed batch."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text[:MAX_ERROR_CHARS]
