"""Helpers for the tests of the non-diffusers generator kinds: a misbehaving python generator and image files."""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from d3builder.generators.examples.tiny_gan import generate


def encoded(seed: int, size: tuple[int, int], fmt: str, **options: object) -> bytes:
    """A noise image of `size` encoded as `fmt`."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


def record_of(prompt: str) -> str:
    """The record id that ends a test prompt ("a photo number 1003")."""
    return re.findall(r"(\d+)$", prompt)[0]


JPEG_OF_1019 = encoded(1019, (40, 30), "JPEG", quality=83)


def flaky(prompts: list[str], negative_prompts: list[str | None], sizes: list[tuple[int, int]],
          seeds: list[int]) -> list[object]:
    """The tiny GAN, except: 1007 raises, 1011 returns a string, 1015 garbage bytes, 1019 a JPEG file (kept as
    is), and a batch holding 1023 returns one image too few. Run with batch size 1."""
    records = [record_of(p) for p in prompts]
    if "1007" in records:
        raise RuntimeError("the research code crashed")
    if "1023" in records:
        return []
    images: list[object] = list(generate(prompts, negative_prompts, sizes, seeds))
    for i, record in enumerate(records):
        images[i] = {"1011": "not an image", "1015": b"\x89PNG garbage", "1019": JPEG_OF_1019}.get(record, images[i])
    return images


def wrong_signature(prompts: list[str]) -> list[object]:
    """A generator that does not follow the ImageFunction protocol."""
    return []
