"""What a blob of bytes is as an image: decoded with Pillow's decompression-bomb guard on, never re-encoded."""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass

from PIL import Image as PILImage
from PIL import UnidentifiedImageError

JPEG_FORMATS = {"JPEG", "MPO"}
ERROR_CHARS = 300
_BYTES_LITERAL = re.compile(r"""(?<![A-Za-z0-9_])b(['"])(?:\\.|(?!\1).)*\1""", re.S)


def error_text(message: str) -> str:
    """A decoder's error message with any bytes literal (image bytes it quoted) blanked, length capped."""
    return _BYTES_LITERAL.sub("<bytes>", message)[:ERROR_CHARS]


@dataclass(frozen=True)
class Inspection:
    """What one record's fetched bytes turned out to be (or why there are none)."""

    error: str | None = None
    width: int | None = None
    height: int | None = None
    encoding: str | None = None
    sha256: str | None = None
    num_bytes: int | None = None


def inspect_image(data: bytes | memoryview, max_bytes: int) -> Inspection:
    """Decode `data` with Pillow, decompression-bomb guard on: its size and format, or why it is no usable image.

    JPEGs are decoded at 1/8 scale (libjpeg's DCT scaling): every entropy-coded byte is still decoded, so
    truncated or corrupt data fails exactly as in a full decode, for about half the CPU.
    """
    size, digest = len(data), hashlib.sha256(data).hexdigest()

    def failed(reason: str) -> Inspection:
        return Inspection(error=reason, sha256=digest, num_bytes=size)

    if size == 0:
        return failed("empty response: the server sent no bytes")
    if size > max_bytes:
        return failed(f"too large: {size} bytes, over max_image_bytes={max_bytes}")
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            width, height, encoding = image.width, image.height, image.format
            limit = PILImage.MAX_IMAGE_PIXELS
            if limit and width * height > limit:
                return failed(f"decompression bomb guard: {width}x{height} pixels, over Pillow's {limit}")
            if encoding in JPEG_FORMATS:
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
            return Inspection(None, width, height, encoding, digest, size)
    except PILImage.DecompressionBombError as exc:
        return failed(f"decompression bomb guard: {exc}")
    except UnidentifiedImageError:
        return failed(f"not an image Pillow can identify ({size} bytes)")
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the bytes are no usable image
        return failed(error_text(f"image does not decode: {type(exc).__name__}: {exc}"))
