"""The CoDE augmentation families (D3_FACTS.md): a declarative table, random draws and exact replay.

Every op takes and returns an RGB PIL image. Randomness beyond the level (stripe
orientation, crop position, shuffle permutation, pad colour, skew axis) is drawn once
into an op's JSON-serialisable ``extra`` dict, so recorded ops replay bit for bit.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

# Geometric ops never produce a side above this (keeps scale/resize of odd banners bounded).
MAX_SIDE = 4096
# Opacity blends the image over this background (what a transparent image shows on a page).
OPACITY_BACKGROUND = (255, 255, 255)
# Overlay stripes are solid white bands covering about half of the image (density 0.5).
STRIPE_COLOUR = 255
STRIPE_DENSITY = 0.5
GRID_STEPS = 5

OpFn = Callable[[Image.Image, float, dict], Image.Image]
ExtraFn = Callable[[np.random.Generator], dict]


@dataclass(frozen=True)
class Family:
    """One augmentation family: its published range, its level grid and its implementation."""

    name: str
    low: float
    high: float
    levels: tuple[float, ...]
    fn: OpFn = field(repr=False, compare=False)
    draw_extra: ExtraFn | None = field(default=None, repr=False, compare=False)


@dataclass
class Op:
    """One recorded augmentation: family name, level and the extra randomness it drew."""

    family: str
    level: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {"family": self.family, "level": float(self.level), "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Op:
        """Rebuild an op from ``to_dict`` output, checking family and level."""
        if not isinstance(d, dict) or "family" not in d or "level" not in d:
            raise ValueError(f"augmentation op record needs 'family' and 'level': {d!r}")
        extra = d.get("extra") or {}
        if not isinstance(extra, dict):
            raise ValueError(f"augmentation op record has a non-dict 'extra': {d!r}")
        op = cls(family=str(d["family"]), level=float(d["level"]), extra=dict(extra))
        _family_for(op.family, op.level)
        return op


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency over white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _fit(w: float, h: float) -> tuple[int, int]:
    """Round a target size to ints, at least 1x1 and at most MAX_SIDE on the long side."""
    shrink = min(1.0, MAX_SIDE / max(w, h, 1e-9))
    return max(1, round(w * shrink)), max(1, round(h * shrink))


def _resize(img: Image.Image, w: float, h: float) -> Image.Image:
    """Bilinear resize to a clamped size (no-op when the size is unchanged)."""
    size = _fit(w, h)
    return img if size == img.size else img.resize(size, Image.Resampling.BILINEAR)


def _blur(img: Image.Image, level: float, extra: dict) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=level))


def _enhance(enhancer: type) -> OpFn:
    """Wrap a PIL ImageEnhance class (factor 1 = unchanged) as an op."""
    def op(img: Image.Image, level: float, extra: dict) -> Image.Image:
        return enhancer(img).enhance(level)

    return op


def _aspect_ratio(img: Image.Image, level: float, extra: dict) -> Image.Image:
    """Change width/height to ``level`` keeping the pixel area."""
    area = img.width * img.height
    w = math.sqrt(area * level)
    return _resize(img, w, area / w)


def _pixelization(img: Image.Image, level: float, extra: dict) -> Image.Image:
    """Downscale by ``level`` then blow back up with nearest neighbour (1 = unchanged)."""
    small = _resize(img, img.width * level, img.height * level)
    return small if small.size == img.size else small.resize(img.size, Image.Resampling.NEAREST)


def _inscribed_size(w: int, h: int, degrees: float) -> tuple[float, float]:
    """Largest axis-aligned rectangle inside a w x h rectangle rotated by ``degrees``."""
    sin_a, cos_a = abs(math.sin(math.radians(degrees))), abs(math.cos(math.radians(degrees)))
    long_side, short_side = max(w, h), min(w, h)
    if short_side <= 2 * sin_a * cos_a * long_side or abs(sin_a - cos_a) < 1e-10:
        x = short_side / 2
        return (x / sin_a, x / cos_a) if w >= h else (x / cos_a, x / sin_a)
    cos_2a = cos_a * cos_a - sin_a * sin_a
    return (w * cos_a - h * sin_a) / cos_2a, (h * cos_a - w * sin_a) / cos_2a


def _rotation(img: Image.Image, level: float, extra: dict) -> Image.Image:
    """Rotate counter-clockwise, cropping to the largest rectangle without empty corners."""
    rotated = img.rotate(level, resample=Image.Resampling.BILINEAR, expand=True)
    wr, hr = _inscribed_size(img.width, img.height, level)
    wr, hr = min(max(1.0, wr), rotated.width), min(max(1.0, hr), rotated.height)
    left, top = round((rotated.width - wr) / 2), round((rotated.height - hr) / 2)
    return rotated.crop((left, top, left + max(1, round(wr)), top + max(1, round(hr))))


def _jpeg(img: Image.Image, level: float, extra: dict) -> Image.Image:
    """Round-trip through an in-memory JPEG at quality ``level``."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(round(level)))
    buf.seek(0)
    with Image.open(buf) as decoded:
        return decoded.convert("RGB")


def _grayscale(img: Image.Image, level: float, extra: dict) -> Image.Image:
    return img.convert("L").convert("RGB")


def _hflip(img: Image.Image, level: float, extra: dict) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _opacity(img: Image.Image, level: float, extra: dict) -> Image.Image:
    """Show the image at opacity ``level`` over OPACITY_BACKGROUND."""
    return Image.blend(Image.new("RGB", img.size, OPACITY_BACKGROUND), img, level)


def _draw_orientation(rng: np.random.Generator) -> dict:
    return {"orientation": "horizontal" if rng.integers(2) == 0 else "vertical"}


def _overlay_stripes(img: Image.Image, level: float, extra: dict) -> Image.Image:
    """Paint solid bands ``level`` of the image across, one band per 1/STRIPE_DENSITY widths."""
    horizontal = extra["orientation"] == "horizontal"
    arr = np.array(img)
    length = arr.shape[0] if horizontal else arr.shape[1]
    width = max(1, round(level * length))
    period = max(width + 1, round(width / STRIPE_DENSITY))
    on = (np.arange(length) % period) < width
    if horizontal:
        arr[on, :, :] = STRIPE_COLOUR
    else:
        arr[:, on, :] = STRIPE_COLOUR
    return Image.fromarray(arr)


def _draw_colour(rng: np.random.Generator) -> dict:
    return {"colour": [int(c) for c in rng.integers(0, 256, size=3)]}


def _pad(img: Image.Image, level: float, extra: dict) -> Image.Image:
    """Pad each side by ``level`` of the image's width/height (at least 1 px) in the recorded colour."""
    dx, dy = max(1, round(level * img.width)), max(1, round(level * img.height))
    return ImageOps.expand(img, border=(dx, dy, dx, dy), fill=tuple(extra["colour"]))


def _resize_short(img: Image.Image, level: float, extra: dict) -> Image.Image:
    """Resize so the shorter side is ``level`` px, keeping the aspect ratio."""
    scale = level / min(img.size)
    return _resize(img, img.width * scale, img.height * scale)


def _draw_position(rng: np.random.Generator) -> dict:
    return {"x": float(rng.random()), "y": float(rng.random())}


def _random_crop(img: Image.Image, level: float, extra: dict) -> Image.Image:
    """Crop a ``level``-px square (clamped to the image) at the recorded relative position."""
    cw, ch = min(img.width, max(1, round(level))), min(img.height, max(1, round(level)))
    left = min(int(extra["x"] * (img.width - cw + 1)), img.width - cw)
    top = min(int(extra["y"] * (img.height - ch + 1)), img.height - ch)
    return img.crop((left, top, left + cw, top + ch))


def _scale(img: Image.Image, level: float, extra: dict) -> Image.Image:
    return _resize(img, img.width * level, img.height * level)


def _draw_seed(rng: np.random.Generator) -> dict:
    return {"seed": int(rng.integers(0, 2**32))}


def _shuffle_pixels(img: Image.Image, level: float, extra: dict) -> Image.Image:
    """Permute a ``level`` fraction of the pixels among themselves (seeded by the record)."""
    arr = np.array(img)
    flat = arr.reshape(-1, 3)
    count = int(level * flat.shape[0])
    if count < 2:
        return img
    g = np.random.default_rng(extra["seed"])
    chosen = g.choice(flat.shape[0], size=count, replace=False)
    flat[chosen] = flat[g.permutation(chosen)]
    return Image.fromarray(arr)


def _draw_axis(rng: np.random.Generator) -> dict:
    return {"axis": int(rng.integers(2))}


def _skew(img: Image.Image, level: float, extra: dict) -> Image.Image:
    """Shear about the centre by ``level`` along the recorded axis (0: x, 1: y), black fill."""
    w, h = img.size
    if extra["axis"] == 0:
        data = (1.0, level, -level * h / 2, 0.0, 1.0, 0.0)
    else:
        data = (1.0, 0.0, 0.0, level, 1.0, -level * w / 2)
    return img.transform(img.size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)


def _family(name: str, low: float, high: float, fn: OpFn, draw_extra: ExtraFn | None = None) -> Family:
    """Build a table row with its 5-step grid (a single level when the range is a point)."""
    steps = 1 if low == high else GRID_STEPS
    levels = tuple(round(float(v), 6) for v in np.linspace(low, high, steps))
    return Family(name, float(low), float(high), levels, fn, draw_extra)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        _family("blur", 0.1, 2.0, _blur),
        _family("brightness", 0.5, 2.0, _enhance(ImageEnhance.Brightness)),
        _family("aspect_ratio", 0.75, 2.0, _aspect_ratio),
        _family("pixelization", 0.3, 1.0, _pixelization),
        _family("rotation", 90.0, 270.0, _rotation),
        _family("contrast", 0.5, 1.5, _enhance(ImageEnhance.Contrast)),
        _family("saturation", 0.5, 1.5, _enhance(ImageEnhance.Color)),
        _family("jpeg", 40.0, 100.0, _jpeg),
        _family("grayscale", 1.0, 1.0, _grayscale),
        _family("hflip", 1.0, 1.0, _hflip),
        _family("opacity", 0.2, 1.0, _opacity),
        _family("overlay_stripes", 0.05, 0.35, _overlay_stripes, _draw_orientation),
        _family("pad", 0.01, 0.25, _pad, _draw_colour),
        _family("resize", 64.0, 512.0, _resize_short),
        _family("random_crop", 64.0, 512.0, _random_crop, _draw_position),
        _family("scale", 0.5, 1.5, _scale),
        _family("sharpen", 1.2, 2.0, _enhance(ImageEnhance.Sharpness)),
        _family("shuffle_pixels", 0.0, 0.35, _shuffle_pixels, _draw_seed),
        _family("skew", -1.0, 1.0, _skew, _draw_axis),
    )
}


def _family_for(name: str, level: float) -> Family:
    """Look a family up and check the level lies in its range, with a clear error."""
    fam = FAMILIES.get(name)
    if fam is None:
        raise ValueError(f"unknown augmentation family {name!r}; known: {sorted(FAMILIES)}")
    if not fam.low - 1e-9 <= level <= fam.high + 1e-9:
        raise ValueError(f"level {level} of {name!r} is outside its range [{fam.low}, {fam.high}]")
    return fam


def _apply_op(img: Image.Image, op: Op) -> Image.Image:
    fam = _family_for(op.family, op.level)
    try:
        return fam.fn(img, float(op.level), op.extra)
    except KeyError as missing:
        raise ValueError(f"op {op.to_dict()} lacks its extra field {missing}") from None


def draw_ops(rng: np.random.Generator, max_ops: int = 2, families: Sequence[str] | None = None) -> list[Op]:
    """Draw 0..max_ops distinct families (uniform count), each at a uniform grid level."""
    names = list(FAMILIES) if families is None else list(families)
    for name in names:
        if name not in FAMILIES:
            raise ValueError(f"unknown augmentation family {name!r}; known: {sorted(FAMILIES)}")
    if not 0 <= max_ops <= len(names):
        raise ValueError(f"max_ops={max_ops} must lie in 0..{len(names)} (the number of families)")
    count = int(rng.integers(0, max_ops + 1))
    ops = []
    for i in rng.choice(len(names), size=count, replace=False):
        fam = FAMILIES[names[int(i)]]
        level = fam.levels[int(rng.integers(len(fam.levels)))]
        ops.append(Op(fam.name, level, fam.draw_extra(rng) if fam.draw_extra else {}))
    return ops


def apply_ops(img: Image.Image, ops: Sequence[Op]) -> Image.Image:
    """Replay recorded ops in order on ``img`` as RGB (deterministic; ``img`` is never mutated)."""
    out = to_rgb(img)
    for op in ops:
        out = _apply_op(out, op)
    return out


def random_augment(img: Image.Image, rng: np.random.Generator, max_ops: int = 2) -> tuple[Image.Image, list[Op]]:
    """Draw ops with ``rng``, apply them and return the image and the recorded ops."""
    ops = draw_ops(rng, max_ops)
    return apply_ops(img, ops), ops


def apply_family(img: Image.Image, family: str, level: float, rng: np.random.Generator | None = None) -> Image.Image:
    """Apply one family at ``level``; extra randomness comes from ``rng`` (seed 0 if None)."""
    fam = _family_for(family, level)
    rng = np.random.default_rng(0) if rng is None else rng
    extra = fam.draw_extra(rng) if fam.draw_extra else {}
    return apply_ops(img, [Op(family, float(level), extra)])


def resize_center_crop(img: Image.Image, short_side: int = 248, crop: int = 224) -> Image.Image:
    """Resize the shorter side to ``short_side`` and centre-crop ``crop`` x ``crop``."""
    if not 0 < crop <= short_side:
        raise ValueError(f"crop={crop} must lie in 1..short_side={short_side}")
    img = to_rgb(img)
    side = min(img.size) * crop / short_side  # the crop's side in source pixels
    left, top = (img.width - side) / 2, (img.height - side) / 2
    return img.resize((crop, crop), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
