"""Output encoding of generated images: a format (and JPEG quality) drawn per image from the LAION mix."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from PIL import Image

FORMATS = ("BMP", "GIF", "JPEG", "PNG", "TIFF")
"""Formats of the LAION encoding mix, in the fixed order the cumulative draw walks."""

DRAW_BITS = 53
"""Bits of the hash used as a uniform draw in [0, 1) (exact as a float)."""


@dataclass(frozen=True)
class Encoding:
    """How one image is encoded: a Pillow format name and, for JPEG, its quality."""

    format: str
    quality: int | None = None


def _uniform(*parts: object) -> float:
    """A stable draw in [0, 1) from the parts (sha256, never Python's salted hash())."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return (int.from_bytes(digest[:8], "big") >> (64 - DRAW_BITS)) / 2**DRAW_BITS


def check_quality_range(jpeg_quality: Sequence[int]) -> tuple[int, int]:
    """The (low, high) JPEG quality range, validated: two integers with 1 <= low <= high <= 100."""
    if len(jpeg_quality) != 2 or not all(isinstance(q, int) and not isinstance(q, bool) for q in jpeg_quality):
        raise ValueError(f"jpeg_quality must be [low, high] integers, got {list(jpeg_quality)!r}")
    low, high = jpeg_quality
    if not 1 <= low <= high <= 100:
        raise ValueError(f"jpeg_quality must satisfy 1 <= low <= high <= 100, got {list(jpeg_quality)!r}")
    return low, high


def check_mix(mix: Mapping[str, float]) -> None:
    """Reject unknown formats, negative weights or a mix without any weight."""
    unknown = set(mix) - set(FORMATS)
    if unknown:
        raise ValueError(f"encoding mix: unknown formats {sorted(unknown)} (known: {', '.join(FORMATS)})")
    if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"encoding mix: weights must be >= 0 with a positive sum, got {dict(mix)}")


def draw_encoding(
    record_id: str, generator: str, seed: int, mix: Mapping[str, float], jpeg_quality: Sequence[int]
) -> Encoding:
    """The encoding of one image, a pure function of (record id, generator, seed) and the mix."""
    check_mix(mix)
    total = sum(mix.values())
    draw = _uniform("encoding", generator, seed, record_id) * total
    chosen = next(f for f in FORMATS if mix.get(f, 0) > 0)
    cumulative = 0.0
    for fmt in FORMATS:
        weight = mix.get(fmt, 0.0)
        if weight <= 0:
            continue
        cumulative += weight
        chosen = fmt
        if draw < cumulative:
            break
    if chosen != "JPEG":
        return Encoding(chosen)
    return Encoding("JPEG", jpeg_quality_for(record_id, generator, seed, jpeg_quality))


def jpeg_quality_for(record_id: str, generator: str, seed: int, jpeg_quality: Sequence[int]) -> int:
    """The JPEG quality of one image, uniform over the inclusive range and independent of the format draw."""
    low, high = check_quality_range(jpeg_quality)
    return min(high, low + int(_uniform("jpeg_quality", generator, seed, record_id) * (high - low + 1)))


def encode_image(image: Image.Image, encoding: Encoding) -> bytes:
    """Encode an RGB image; GIF is quantised to a 256-colour adaptive palette first."""
    buffer = io.BytesIO()
    if encoding.format == "JPEG":
        image.save(buffer, "JPEG", quality=encoding.quality)
    elif encoding.format == "GIF":
        image.convert("RGB").quantize(colors=256).save(buffer, "GIF")
    elif encoding.format in FORMATS:
        image.save(buffer, encoding.format)
    else:
        raise ValueError(f"unknown encoding {encoding.format!r} (known: {', '.join(FORMATS)})")
    return buffer.getvalue()
