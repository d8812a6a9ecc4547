"""A tiny GAN-like generator with random weights: an example `kind: python` callable that runs on any CPU.

    generators:
      tiny-gan:
        kind: python
        callable: d3builder.generators.examples.tiny_gan:generate
        sizes: [[64, 64], [64, 48]]

A text embedding (hashed words, averaged) and a latent drawn from the seed go through a linear layer and
three transposed convolutions to a 32x32 image, resized to the requested size. Image i depends only on
prompt i and seed i; the negative prompts are ignored, as GANs have none.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from torch import nn

VOCABULARY = 1024
LATENT = 16
TEXT = 16
WEIGHTS_SEED = 0


def tokens(prompt: str) -> list[int]:
    """Each word of the prompt hashed into the vocabulary (stable across processes)."""
    words = prompt.lower().split() or [""]
    return [int.from_bytes(hashlib.sha256(w.encode("utf-8")).digest()[:4], "big") % VOCABULARY for w in words]


class TinyGenerator(nn.Module):
    """(latent, text) -> 3x32x32 image in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(VOCABULARY, TEXT, mode="mean")
        self.project = nn.Linear(LATENT + TEXT, 64 * 4 * 4)
        self.up = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(16, 3, 4, 2, 1), nn.Tanh(),
        )

    def forward(self, latent: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        text = self.embed(words.unsqueeze(0))
        hidden = self.project(torch.cat([latent.unsqueeze(0), text], dim=1)).view(1, 64, 4, 4)
        return self.up(hidden)[0]


@lru_cache(maxsize=1)
def model() -> TinyGenerator:
    """The generator with its fixed random weights (the caller's RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHTS_SEED)
        return TinyGenerator().eval()


@torch.no_grad()
def generate(prompts: list[str], negative_prompts: list[str | None], sizes: list[tuple[int, int]],
             seeds: list[int]) -> list[Image.Image]:
    """One RGB image per prompt at its size (the ImageFunction protocol of d3builder.generators.backends.function)."""
    images = []
    for prompt, (width, height), seed in zip(prompts, sizes, seeds, strict=True):
        latent = torch.randn(LATENT, generator=torch.Generator().manual_seed(int(seed)))
        pixels = model()(latent, torch.tensor(tokens(prompt)))
        array = ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        images.append(Image.fromarray(array).resize((width, height), Image.Resampling.BILINEAR))
    return images
