"""The input preprocessing of an embedder, as data: crop size and normalisation, carried by the model.

The model's config (`CoDEEmbedder.config()`, saved with its weights) holds the input size and
mean/std; training's clean and global views, evaluation, detection and the bundle's
`preprocessing` block all take them from here, so they cannot drift apart. The geometry is
CoDE's: the shorter side resized to size x 248/224, then the central size x size crop
(248 -> 224 for the paper's ViT-Tiny).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from codetrain.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RESIZE_RATIO,
    ViewMaker,
    eval_transform,
)

NORMALISATIONS = ("imagenet", "model")
"""`imagenet`: ImageNet mean/std (the paper); `model`: the mean/std of timm's data config for the model."""


@dataclass(frozen=True)
class Preprocessing:
    """Input size and normalisation of an embedder (defaults: the paper's 224 px, ImageNet mean/std)."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def resize(self) -> int:
        """The shorter side before the centre crop (248 for 224)."""
        return round(self.size * RESIZE_RATIO)

    def transform(self, img: Image.Image) -> torch.Tensor:
        """One image as the embedder's normalised float32 [3, size, size] input."""
        return eval_transform(img, self.size, self.mean, self.std)

    def view_maker(self, local_size: int, max_ops: int) -> ViewMaker:
        """Training's view maker: clean, augmented and global views at this size, local crops at `local_size`."""
        return ViewMaker(local_size=local_size, global_size=self.size, max_ops=max_ops, mean=self.mean, std=self.std)

    def describe(self) -> dict[str, Any]:
        """The preprocessing as data (the `preprocessing` block of a bundle's config.json)."""
        return {
            "decode": "Pillow at full size (no JPEG draft reduction), first frame; RGB with transparency composited over white",
            "resize_shorter_side": self.resize,
            "center_crop": self.size,
            "interpolation": "bilinear (antialiased), resize and crop in one resample",
            "scale": "pixel values / 255",
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": f"float32 NCHW, batch of [3, {self.size}, {self.size}]",
        }

    def summary(self) -> str:
        """One sentence for reports."""
        return (f"RGB, resize shorter side to {self.resize}, centre-crop {self.size}, "
                f"normalise with mean {_short(self.mean)} and std {_short(self.std)}")


def _short(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


PAPER = Preprocessing()
"""The paper's preprocessing: 248 -> 224 px, ImageNet mean/std."""


def preprocessing_of(model: torch.nn.Module) -> Preprocessing:
    """The preprocessing an embedder expects (its `preprocessing` attribute; the paper's when it has none)."""
    return getattr(model, "preprocessing", PAPER)
