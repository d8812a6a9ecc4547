"""The one image decode and clean preprocessing of training, evaluation and detection, and the eight CoDE views.

Every encoded image, whatever its class, size or use, is decoded by `decode_rgb` (full size,
first frame, RGB) and its clean view made by `clean_view`: training's x_r/x_f, evaluation,
detection and the exported bundle's documented preprocessing (`codetrain.preprocessing`) are the same
function of the same bytes, bit for bit. Every training view's randomness (augmentation ops,
crop boxes) is drawn from the record's RNG. Resizes run on uint8 tensors with torch's
antialiased bilinear kernel (the same filter as Pillow's, about four times faster) on the
decoded pixels shared with Pillow through Arrow (RGBX, no copy); a crop is a slice, so
crop-then-resize is one interpolation of just the crop. Augmentation ops run on PIL images
(`d3builder.imaging.augmentations`).
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from d3builder.imaging.augmentations import Op, apply_ops, draw_ops, to_rgb

EVAL_SIZE = 224
RESIZE_RATIO = 248 / 224
"""Clean views resize the shorter side to 248 before the 224 centre crop."""
GLOBAL_SCALE = (0.4, 1.0)
LOCAL_SCALE = (0.05, 0.4)
RATIO = (3 / 4, 4 / 3)
POINTWISE = frozenset({"brightness", "contrast", "saturation", "grayscale", "hflip", "opacity"})
"""Ops that commute with resizing (per pixel, mirror, or a global mean): applied after the 248 resize."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""timm's IMAGENET_DEFAULT_MEAN/STD, copied so loader workers need not import timm (a test checks they agree)."""
VIEW_KEYS = ("x_r", "x_f", "a_r", "a_f", "g_r", "g_f", "l_r", "l_f")

Stats = tuple[float, float, float]
"""A per-channel (R, G, B) mean or std."""

Box = tuple[int, int, int, int]
"""A crop (left, top, width, height) in the image's original pixels."""


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one thread (as in DataLoader workers): small per-image ops only lose from threading."""
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


def to_uint8(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 [C,H,W] tensor: C = 4 (RGBX, Pillow's own memory, no copy) or 3 (a copy)."""
    try:
        pixels = pa.array(img).values.to_numpy(zero_copy_only=True).reshape(img.height, img.width, 4)
    except (ValueError, TypeError, pa.ArrowException):  # e.g. an image too big for one memory block
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
    with warnings.catch_warnings():  # read-only memory: the views only ever read it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(pixels).permute(2, 0, 1)


@functools.lru_cache(maxsize=8)
def _pixel_stats(mean: Stats, std: Stats) -> tuple[np.ndarray, np.ndarray]:
    """Mean x 255 and 1 / (std x 255) as [3,1,1] float32 arrays."""
    return (np.array(mean, np.float32) * 255).reshape(3, 1, 1), (1 / (np.array(std, np.float32) * 255)).reshape(3, 1, 1)


def normalise(
    x: torch.Tensor, out: np.ndarray | None = None, mean: Stats = IMAGENET_MEAN, std: Stats = IMAGENET_STD
) -> torch.Tensor:
    """uint8 [C,H,W] (RGB first) to float32 [3,H,W], mean/std normalised (into `out` if given)."""
    pixel_mean, pixel_inv_std = _pixel_stats(tuple(mean), tuple(std))
    out = np.empty((3, *x.shape[1:]), np.float32) if out is None else out
    np.subtract(x[:3].numpy(), pixel_mean, out=out, dtype=np.float32)
    out *= pixel_inv_std
    return torch.from_numpy(out)


def resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 [3,H,W] tensor (Pillow's BILINEAR filter)."""
    if tuple(x.shape[1:]) == (height, width):
        return x
    return F.interpolate(x[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]


def resize_short(x: torch.Tensor, short: int) -> torch.Tensor:
    """Resize so the shorter side is `short`, keeping the aspect ratio (torchvision's `Resize(short)` sizes)."""
    h, w = x.shape[1:]
    long = max(1, int(short * max(h, w) / min(h, w)))
    return resize(x, short, long) if h <= w else resize(x, long, short)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central `size` x `size` square (torchvision's rounding); the input is at least that big."""
    h, w = x.shape[1:]
    top, left = round((h - size) / 2), round((w - size) / 2)
    return x[:, top : top + size, left : left + size]


def decode_rgb(data: bytes) -> Image.Image:
    """Decode encoded image bytes at full size (first frame; Pillow's decompression-bomb guard on) as RGB.

    The one decode of every image in training, evaluation and detection; raises on anything unreadable.
    """
    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb(img)


def clean_view(pixels: torch.Tensor, size: int = EVAL_SIZE) -> torch.Tensor:
    """Shorter side to round(size * 248 / 224), centre crop `size`: uint8 [C,H,W] to uint8 [3,size,size]."""
    return center_crop(resize_short(pixels, round(size * RESIZE_RATIO)), size)[:3]


def eval_transform(img: Image.Image, size: int = EVAL_SIZE, mean: Stats = IMAGENET_MEAN, std: Stats = IMAGENET_STD) -> torch.Tensor:
    """`clean_view` of an image, normalised: float32 [3,size,size], exactly training's x_r/x_f of the same pixels.

    Callers with a model use `codetrain.preprocessing.Preprocessing.transform`, which passes the model's values.
    """
    with single_thread():
        return normalise(clean_view(to_uint8(to_rgb(img)), size), None, mean, std)


def random_resized_crop_box(size: tuple[int, int], scale: tuple[float, float], rng: np.random.Generator) -> Box:
    """torchvision's RandomResizedCrop box (area `scale`, ratio 3/4-4/3, 10 tries, centre fallback) from `rng`."""
    width, height = size
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return left, top, w, h
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif ratio > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclass
class ViewPlan:
    """The random choices of one image's views, drawn on its original size."""

    size: tuple[int, int]
    ops: list[Op] = field(default_factory=list)
    global_box: Box | None = None
    local_box: Box | None = None


class ViewMaker:
    """Draws and renders x/a/g/l views of a real and a fake image (only x in eval mode)."""

    def __init__(
        self, local_size: int = 96, global_size: int = EVAL_SIZE, max_ops: int = 2, eval_mode: bool = False,
        mean: Stats = IMAGENET_MEAN, std: Stats = IMAGENET_STD,
    ) -> None:
        self.local_size, self.global_size, self.max_ops, self.eval_mode = local_size, global_size, max_ops, eval_mode
        self.short_side = round(global_size * RESIZE_RATIO)
        self.mean, self.std = tuple(mean), tuple(std)

    def draw(self, size: tuple[int, int], rng: np.random.Generator) -> ViewPlan:
        """Draw one image's ops and crop boxes (nothing in eval mode)."""
        if self.eval_mode:
            return ViewPlan(size)
        ops = draw_ops(rng, self.max_ops)
        return ViewPlan(size, ops, random_resized_crop_box(size, GLOBAL_SCALE, rng), random_resized_crop_box(size, LOCAL_SCALE, rng))

    def render(self, img: Image.Image, plan: ViewPlan, tag: str) -> dict[str, torch.Tensor]:
        """The uint8 [3,H,W] views of one decoded RGB image, the plan drawn on its size."""
        pixels = to_uint8(img)
        views = {f"x_{tag}": clean_view(pixels, self.global_size)}
        if self.eval_mode:
            return views
        views[f"a_{tag}"] = self._augment(img, pixels, plan.ops)[:3] if plan.ops else views[f"x_{tag}"]
        for name, (left, top, w, h), out in (("g", plan.global_box, self.global_size), ("l", plan.local_box, self.local_size)):
            views[f"{name}_{tag}"] = resize(pixels[:, top : top + h, left : left + w], out, out)[:3]
        return views

    def _augment(self, img: Image.Image, pixels: torch.Tensor, ops: list[Op]) -> torch.Tensor:
        """Ops then resize (shorter side 248) and centre crop; pointwise-only ops run on the resized image."""
        if POINTWISE.issuperset(op.family for op in ops):
            short = resize_short(pixels, self.short_side)
            out = to_uint8(apply_ops(Image.fromarray(short[:3].permute(1, 2, 0).numpy()), ops))
        else:
            out = resize_short(to_uint8(apply_ops(img, ops)), self.short_side)
        return center_crop(out, self.global_size)

    def make(
        self, real: Image.Image, fake: Image.Image, rng: np.random.Generator, normalised: bool = True
    ) -> dict[str, torch.Tensor]:
        """The views of a decoded (real, fake) pair: x_r, x_f, a_r, a_f, g_r, g_f, l_r, l_f.

        Normalised float32 [3,H,W], or uint8 with `normalised=False`.
        """
        plans = self.draw(real.size, rng), self.draw(fake.size, rng)
        with single_thread():
            views = {**self.render(to_rgb(real), plans[0], "r"), **self.render(to_rgb(fake), plans[1], "f")}
        return {key: normalise(view, None, self.mean, self.std) for key, view in views.items()} if normalised else views

    def make_encoded(
        self, real: bytes, fake: bytes, rng: np.random.Generator, normalised: bool = True
    ) -> dict[str, torch.Tensor]:
        """The same views from encoded bytes, each image decoded once by `decode_rgb` (as evaluation decodes it).

        With `normalised=False` the views stay uint8 [3,H,W] (`codetrain.data.collate` normalises
        a whole batch at once).
        """
        return self.make(decode_rgb(real), decode_rgb(fake), rng, normalised)
